"""Global batches: each process loads only the rows its devices hold; jit sees one global jax.Array.

The loader reads the same global sequence of windows whatever the process count, and process p
takes its block of rows of every batch (`process_rows`), so 2 processes x 2 devices train on
exactly the batches of 1 process x 4 devices.
"""

from __future__ import annotations

from typing import Mapping

import jax
import ml_collections
import numpy as np

from neon_qtg_jax.config import ConfigError
from neon_qtg_jax.parallel.mesh import describe
from neon_qtg_jax.parallel.sharding import ShardingConfig


def check_batch(config: ml_collections.ConfigDict, sharding: ShardingConfig) -> None:
  """ConfigError unless a microbatch (training.batch_size rows) splits evenly over the batch axes.

  A batch that did not divide would be replicated: every device computing the same rows.
  """
  split = sharding.batch_split()
  rows = config.training.batch_size
  if rows % split:
    batch_axes = dict(sharding.rules).get("batch", ())
    raise ConfigError(f"config field 'training.batch_size' = {rows}: must be divisible by the {split} devices "
                      f"that split the batch (mesh axes {' x '.join(batch_axes)}; mesh {describe(sharding.mesh)}); "
                      f"use a multiple of {split}, or move devices to parallel.tensor")


def process_rows(sharding: ShardingConfig, global_rows: int) -> tuple[int, int]:
  """(block index, block count): this process holds rows [index * n, (index + 1) * n), n = global_rows / count.

  Processes whose devices hold the same rows (the batch replicated over a mesh axis that spans
  processes) get the same block.
  """
  indices = sharding.batch().devices_indices_map((global_rows,))
  mine = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop)
                 for d, s in indices.items() if d.process_index == jax.process_index()})
  start, stop = mine[0][0], mine[-1][1]
  if any(a[1] != b[0] for a, b in zip(mine, mine[1:])) or global_rows % (stop - start):
    raise ValueError(f"process {jax.process_index()} holds rows {mine} of the batch, not one block: "
                     f"order the mesh devices by process")
  return start // (stop - start), global_rows // (stop - start)


def global_batch(local: Mapping[str, np.ndarray], sharding: ShardingConfig, global_rows: int
                 ) -> dict[str, jax.Array]:
  """This process's rows (from a loader sharded by `process_rows`) -> global (global_rows, ...) arrays."""
  rows = sharding.batch()
  return {k: jax.make_array_from_process_local_data(rows, v, (global_rows, *v.shape[1:]))
          for k, v in local.items()}


def replicated_batch(full: Mapping[str, np.ndarray], sharding: ShardingConfig) -> dict[str, jax.Array]:
  """A batch every process holds in full (evaluation) -> global arrays split over the batch axes."""
  rows = sharding.batch()
  return {k: jax.make_array_from_callback(v.shape, rows, lambda index, v=v: v[index]) for k, v in full.items()}
