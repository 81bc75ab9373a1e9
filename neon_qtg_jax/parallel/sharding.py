"""Logical axis names -> mesh shardings, for parameters, optimizer state, batches and activations.

Every parameter carries logical axis names in its nnx metadata (`out_sharding`, set in
model/qtg.py; the stacked blocks get "layers" from the vmap that builds them). The config's
`parallel.rules` maps each name to mesh axes. A dimension that its mesh axes do not divide stays
whole, and a mesh axis is used once per array. The optimizer moments carry the same metadata as
the parameters (optax maps over the nnx.State), so they follow the parameters' shardings.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neon_qtg_jax.config import LOGICAL_AXIS_RULES

Rules = Sequence[tuple[str, tuple[str, ...]]]


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
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


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for an nnx.State (params or optimizer state, concrete or abstract) or any pytree.

  Leaves whose nnx Variable names no axes (the optimizer's step count, scalars) are replicated.
  """
  def one(variable):
    if not isinstance(variable, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())
    names = variable.get_metadata().get("out_sharding") or ()
    return variable.replace(NamedSharding(mesh, logical_to_mesh(names, variable.shape, mesh, rules)))
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES, *, leading: int = 0) -> NamedSharding:
  """Rows split over the "batch" rule's mesh axes (after `leading` unsplit axes); other axes whole."""
  axes = tuple(a for a in dict(rules).get("batch", ()) if mesh.shape[a] > 1)
  rows = (axes[0] if len(axes) == 1 else axes) if axes else None
  return NamedSharding(mesh, PartitionSpec(*([None] * leading), rows))


def batch_split(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> int:
  """How many ways the batch rows are split: the product of the "batch" rule's mesh axis sizes."""
  return math.prod(mesh.shape[a] for a in dict(rules).get("batch", ()))


# Activation constraints: the model names activation axes; the mesh and rules come from the
# context the train step traces under (like flax.linen's logical_axis_rules), so the model code
# does not depend on a mesh and runs unconstrained outside it.
_context = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[None]:
  """Within this context (while tracing), `constrain` pins activations to the mesh."""
  previous = getattr(_context, "value", None)
  _context.value = (mesh, tuple(rules))
  try:
    yield
  finally:
    _context.value = previous


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names inside `activation_sharding`; identity outside it."""
  value = getattr(_context, "value", None)
  if value is None:
    return x
  mesh, rules = value
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_mesh(names, x.shape, mesh, rules)))
