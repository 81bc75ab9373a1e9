"""Parameter initializers that the stacked (nnx.vmap over layers) blocks need beyond flax's own."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx


def sequential_orthogonal(scale: float = 1.0) -> Callable[..., jax.Array]:
  """flax's orthogonal initializer, run one matrix at a time when vmapped over the layer axis.

  The values are bit-identical to `nnx.initializers.orthogonal(scale)` (same normal draw, same
  LAPACK QR per matrix). Why not flax's directly: vmapped over the layers it becomes one batched
  QR, which jaxlib's CPU kernel splits over the intra-op thread pool (ParallelBatchMap) and then
  waits for. With several CPU devices on few cores (2 processes x 2 devices on 2 cores, or one
  process with 4 forced devices) every pool thread is already running a device's program that is
  itself waiting in that QR, so the init never finishes. Unbatched, each QR runs inline on its
  own thread. On GPU this costs one loop over the layers at init.
  """
  orthogonal = nnx.initializers.orthogonal(scale)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.custom_batching.sequential_vmap(lambda k: orthogonal(k, shape, dtype))(key)

  return init
