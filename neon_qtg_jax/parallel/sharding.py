"""Logical axis names -> mesh shardings, for parameters, optimizer state, batches, activations and the decode cache.

Every parameter carries logical axis names in its nnx metadata (`out_sharding`, set in
model/qtg.py; the stacked blocks get "layers" from the vmap that builds them), and the decode
cache names its axes in inference/decoding.py. The config's `parallel.rules` maps each name to mesh
axes. A dimension that its mesh axes do not divide stays whole, and a mesh axis is used once per
array. The optimizer moments carry the same metadata as the parameters (optax maps over the
nnx.State), so they follow the parameters' shardings.

`ShardingConfig` (the mesh and the rules) is built once per run from `config.parallel`
(`ShardingConfig.from_config`) and passed to everything that places arrays; nothing here has a
default mesh or default rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Iterator, Sequence

import jax
import ml_collections
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from neon_qtg_jax.config import default_config
from neon_qtg_jax.parallel.mesh import make_mesh

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh,
                    rules: Rules) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose axes have the logical `names` (None: never split)."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for size, name in zip(shape, names):
    axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  """The run's device mesh and logical-axis rules: where every array of the run lives."""
  mesh: Mesh | AbstractMesh
  rules: Rules

  @classmethod
  def from_config(cls, parallel_cfg: ml_collections.ConfigDict,
                  devices: Sequence[jax.Device] | None = None) -> "ShardingConfig":
    """The mesh of config.parallel over `devices` (all devices of all processes when None) and its rules."""
    return cls(make_mesh(parallel_cfg, devices), tuple((name, tuple(axes)) for name, axes in parallel_cfg.rules))

  @classmethod
  def all_fsdp(cls, devices: Sequence[jax.Device] | None = None) -> "ShardingConfig":
    """Every device on fsdp with the default rules: for tools that read a checkpoint without a run config."""
    return cls.from_config(default_config().parallel, devices)

  def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    return logical_to_mesh(names, shape, self.mesh, self.rules)

  def named(self, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names, shape))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def params(self, tree: Any) -> Any:
    """NamedShardings for an nnx.State (params or optimizer state, concrete or abstract) or any pytree.

    Leaves whose nnx Variable names no axes (the optimizer's step count, scalars) are replicated.
    """
    def one(variable):
      if not isinstance(variable, nnx.Variable):
        return self.replicated()
      names = variable.get_metadata().get("out_sharding") or ()
      return variable.replace(self.named(names, variable.shape))
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def batch(self, *, leading: int = 0) -> NamedSharding:
    """Rows split over the "batch" rule's mesh axes (after `leading` unsplit axes); other axes whole."""
    axes = tuple(a for a in dict(self.rules).get("batch", ()) if self.mesh.shape[a] > 1)
    rows = (axes[0] if len(axes) == 1 else axes) if axes else None
    return NamedSharding(self.mesh, PartitionSpec(*([None] * leading), rows))

  def batch_split(self) -> int:
    """How many ways the batch rows are split: the product of the "batch" rule's mesh axis sizes."""
    return math.prod(self.mesh.shape[a] for a in dict(self.rules).get("batch", ()))

  @contextlib.contextmanager
  def activations(self) -> Iterator[None]:
    """Within this context (while tracing), `constrain` pins activations to the mesh by these rules."""
    previous = getattr(_context, "value", None)
    _context.value = self
    try:
      yield
    finally:
      _context.value = previous


# Activation constraints: the model names activation axes; the sharding comes from the context the
# train step traces under (like flax.linen's logical_axis_rules), so the model code does not depend
# on a mesh and runs unconstrained outside it.
_context = threading.local()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names inside `ShardingConfig.activations()`; identity outside it."""
  sharding: ShardingConfig | None = getattr(_context, "value", None)
  if sharding is None:
    return x
  return jax.lax.with_sharding_constraint(x, sharding.named(names, x.shape))
