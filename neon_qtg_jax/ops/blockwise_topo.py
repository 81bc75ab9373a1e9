"""Causal persistence s_t of the TopoFilter over key blocks, with its exact gradient.

s_t is the mean of the k smallest distances ||phi_t - phi_s||, s < t (k = 1: the minimum).
A min is a selection: its value and gradient depend only on which earlier tokens are the
nearest. So the blockwise pass finds their indices, one (B, block_q, block_k) tile of the
L x L Gram matrix at a time, keeping a running top-k per query row; then the distances to
those k neighbours are recomputed from the gathered unit states, O(L k 2d) memory, and
differentiated by JAX through the same `k_smallest_mean` the reference uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neon_qtg_jax.ops.blockwise_geo import effective_blocks, key_blocks_up_to
from neon_qtg_jax.ops.topo_filter import k_smallest_mean, unit_states


def squared_distances(phi_q: jax.Array, phi_k: jax.Array) -> jax.Array:
  """||a - b||^2 = max(2 - 2 a.b, 0) for unit rows: (B, Lq, C), (B, Lk, C) -> (B, Lq, Lk) float32."""
  gram = jnp.einsum("bqc,bkc->bqk", phi_q, phi_k, preferred_element_type=jnp.float32)
  return jnp.maximum(2.0 - 2.0 * gram, 0.0)


def _merge_smallest(best_sq, best_idx, tile_sq, tile_idx, k):
  """Keeps the k smallest of the running (…, k) and the tile's (…, bk) candidates."""
  if k == 1:
    arg = jnp.argmin(tile_sq, axis=-1)[..., None]
    tile_min = jnp.take_along_axis(tile_sq, arg, axis=-1)
    tile_arg = jnp.take_along_axis(tile_idx, arg, axis=-1)
    better = tile_min < best_sq
    return jnp.where(better, tile_min, best_sq), jnp.where(better, tile_arg, best_idx)
  cand_sq = jnp.concatenate([best_sq, tile_sq], axis=-1)
  cand_idx = jnp.concatenate([best_idx, tile_idx], axis=-1)
  neg_sq, pos = jax.lax.top_k(-cand_sq, k)
  return -neg_sq, jnp.take_along_axis(cand_idx, pos, axis=-1)


def nearest_earlier(phi: jax.Array, *, k: int, block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
  """Indices of the k nearest earlier tokens of every token, blockwise.

  phi: (B, L, C) unit states. Returns (idx (B, L, k) int32, found (B, L, k) bool); `found`
  is False where token t has fewer than k predecessors. Not differentiable (indices).
  """
  batch, length, _ = phi.shape
  block_q, block_k = effective_blocks(length, block_q, block_k)
  pad_q, pad_k = -length % block_q, -length % block_k
  phi_q = jnp.pad(phi, ((0, 0), (0, pad_q), (0, 0)))
  phi_k = jnp.pad(phi, ((0, 0), (0, pad_k), (0, 0)))
  num_q, num_k = phi_q.shape[1] // block_q, phi_k.shape[1] // block_k

  def query_block(i):
    phi_i = jax.lax.dynamic_slice_in_dim(phi_q, i * block_q, block_q, axis=1)
    q_pos = i * block_q + jnp.arange(block_q)[:, None]

    def key_step(j, carry):
      k_pos = j * block_k + jnp.arange(block_k)[None, :]
      phi_j = jax.lax.dynamic_slice_in_dim(phi_k, j * block_k, block_k, axis=1)
      tile_sq = jnp.where(k_pos < q_pos, squared_distances(phi_i, phi_j), jnp.inf)
      tile_idx = jnp.broadcast_to(k_pos, tile_sq.shape).astype(jnp.int32)
      return _merge_smallest(*carry, tile_sq, tile_idx, k)

    init = (jnp.full((batch, block_q, k), jnp.inf, jnp.float32), jnp.zeros((batch, block_q, k), jnp.int32))
    return jax.lax.fori_loop(0, key_blocks_up_to(i, block_q, block_k, num_k), key_step, init)

  best_sq, best_idx = jax.lax.map(query_block, jnp.arange(num_q))  # (nq, B, bq, k)
  def unblock(x):
    return jnp.moveaxis(x, 0, 1).reshape(batch, num_q * block_q, k)[:, :length]
  return unblock(best_idx), unblock(jnp.isfinite(best_sq))


def topo_persistence_blockwise(psi: jax.Array, *, k: int = 1, eps: float = 1e-6, block_q: int = 128,
                               block_k: int = 128) -> jax.Array:
  """s_t for psi (B, L, 2d) -> (B, L) float32; same values and gradients as topo_persistence_reference."""
  phi = unit_states(psi, eps)
  idx, found = jax.lax.stop_gradient(nearest_earlier(phi, k=k, block_q=block_q, block_k=block_k))
  neighbours = jax.vmap(lambda states, rows: states[rows])(phi, idx)  # (B, L, k, C)
  sq_dist = jnp.maximum(2.0 - 2.0 * jnp.einsum("blc,blkc->blk", phi, neighbours), 0.0)
  return k_smallest_mean(sq_dist, found, k)
