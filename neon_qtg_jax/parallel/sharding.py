"""Sharding rules: each parameter is split over "fsdp" along its largest divisible axis.

The leading layer axis of the stacked blocks is never split, so a scan over layers reads one
layer's shard per step. Parameters smaller than `min_size` elements stay replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MIN_SHARDED_SIZE = 2**14


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, *, skip_leading: int = 0,
              min_size: int = MIN_SHARDED_SIZE) -> PartitionSpec:
  """PartitionSpec putting "fsdp" on the largest axis (after `skip_leading`) divisible by fsdp_size."""
  size = 1
  for n in shape:
    size *= n
  if fsdp_size == 1 or size < min_size:
    return PartitionSpec()
  candidates = [i for i in range(skip_leading, len(shape)) if shape[i] % fsdp_size == 0]
  if not candidates:
    return PartitionSpec()
  axis = max(candidates, key=lambda i: shape[i])
  return PartitionSpec(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def _is_stacked_block(path: tuple[Any, ...]) -> bool:
  keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
  return "blocks" in keys


def param_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params or optimizer state)."""
  fsdp_size = mesh.shape["fsdp"]

  def rule(path, x):
    if not hasattr(x, "shape"):
      return NamedSharding(mesh, PartitionSpec())
    skip = 1 if _is_stacked_block(path) and len(x.shape) > 1 else 0
    return NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, skip_leading=skip))
  return jax.tree_util.tree_map_with_path(rule, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
  """Splits the leading batch axis over every device when it divides evenly, else replicates it."""
  if batch_size % mesh.size == 0:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  return NamedSharding(mesh, PartitionSpec())
