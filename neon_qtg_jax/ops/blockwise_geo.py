"""Blockwise (flash-style) causal attention with an exact custom backward pass.

One loop serves both attention kinds: scores are an elementwise transform g_h of the tile
x = a_i . b_j of two operands,
  geo: a, b = q~, k~ (square-root probabilities), g_h(x) = -gamma_h arccos(x)^2
  dot: a, b = q, k,                                 g_h(x) = gamma_h x with gamma_h = hd^-0.5
followed by a causal softmax over keys and the value sum. The forward pass keeps a running
max and sum per query row (online softmax) and saves only the output and the row
log-sum-exp; the backward pass recomputes each tile. Only one (B, H, block_q, block_k)
tile of the L x L matrix is alive at a time, key blocks above the diagonal are skipped,
and the x tile is float32 whatever the operand dtype (bf16 allowed).

Layout: q, k, v are (B, L, H, hd) as for the references in geo_attention.py; internally
(B, H, L, hd), padded to whole blocks (padded keys lie above the diagonal of every real
query, so causality masks them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from neon_qtg_jax.ops.arccos_sq import arccos_sq
from neon_qtg_jax.ops.geo_attention import MASK_VALUE, sqrt_probs

TRANSFORMS = ("geo", "dot")


def tile_logits(x: jax.Array, gamma: jax.Array, transform: str) -> jax.Array:
  """Scores g(x) of a float32 tile x; gamma broadcasts against x (e.g. (H, 1, 1) or a scalar)."""
  if transform == "geo":
    return -gamma * arccos_sq(x)
  return gamma * x


def tile_logits_and_slopes(x: jax.Array, gamma: jax.Array,
                           transform: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(g(x), dg/dx, dg/dgamma) of a float32 tile, elementwise.

  The geo slope is arccos_sq's own custom derivative (finite at x = 1), taken through jvp.
  """
  if transform == "geo":
    theta_sq, slope = jax.jvp(arccos_sq, (x,), (jnp.ones_like(x),))
    return -gamma * theta_sq, -gamma * slope, -theta_sq
  return gamma * x, jnp.broadcast_to(gamma, x.shape), x


def causal_block_mask(q_start: jax.Array, k_start: jax.Array, block_q: int, block_k: int) -> jax.Array:
  """(block_q, block_k) bool, True where key position <= query position."""
  q_pos = q_start + jnp.arange(block_q)[:, None]
  k_pos = k_start + jnp.arange(block_k)[None, :]
  return k_pos <= q_pos


# Block counts use lax.div on int32: inside a Pallas kernel program ids do not support `//`.
def key_blocks_up_to(q_block: jax.Array, block_q: int, block_k: int, num_k_blocks: int) -> jax.Array:
  """Number of key blocks a causal query block needs: those with some key <= its last query."""
  last_query = jnp.asarray((q_block + 1) * block_q - 1, jnp.int32)
  return jnp.minimum(jax.lax.div(last_query, jnp.int32(block_k)) + 1, num_k_blocks)


def first_query_block(k_block: jax.Array, block_q: int, block_k: int) -> jax.Array:
  """First query block that sees any key of k_block."""
  return jax.lax.div(jnp.asarray(k_block * block_k, jnp.int32), jnp.int32(block_q))


def _slice(x: jax.Array, block: jax.Array, size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, block * size, size, axis=2)


def _forward(a: jax.Array, b: jax.Array, v: jax.Array, gamma: jax.Array, transform: str,
             block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
  """a (B, H, Lq, hd), b and v (B, H, Lk, hd), Lq and Lk whole blocks -> (out like a in v's dtype, lse (B, H, Lq))."""
  batch, heads, len_q, head_dim = a.shape
  num_q, num_k = len_q // block_q, b.shape[2] // block_k
  g = gamma.astype(jnp.float32)[:, None, None]

  def query_block(i):
    a_i = _slice(a, i, block_q)

    def key_step(j, carry):
      acc, row_max, row_sum = carry
      x = jnp.einsum("bhqd,bhkd->bhqk", a_i, _slice(b, j, block_k), preferred_element_type=jnp.float32)
      mask = causal_block_mask(i * block_q, j * block_k, block_q, block_k)
      s = jnp.where(mask, tile_logits(x, g, transform), MASK_VALUE)
      new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
      p = jnp.exp(s - new_max[..., None])
      rescale = jnp.exp(row_max - new_max)
      row_sum = rescale * row_sum + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), _slice(v, j, block_k),
                      preferred_element_type=jnp.float32)
      return rescale[..., None] * acc + pv, new_max, row_sum

    init = (jnp.zeros((batch, heads, block_q, head_dim), jnp.float32),
            jnp.full((batch, heads, block_q), MASK_VALUE, jnp.float32),
            jnp.zeros((batch, heads, block_q), jnp.float32))
    acc, row_max, row_sum = jax.lax.fori_loop(0, key_blocks_up_to(i, block_q, block_k, num_k), key_step, init)
    return (acc / row_sum[..., None]).astype(v.dtype), row_max + jnp.log(row_sum)

  out, lse = jax.lax.map(query_block, jnp.arange(num_q))  # (nq, B, H, bq, hd), (nq, B, H, bq)
  out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, len_q, head_dim)
  lse = jnp.moveaxis(lse, 0, 2).reshape(batch, heads, len_q)
  return out, lse


def _backward(a, b, v, gamma, out, lse, dout, transform, block_q, block_k):
  """Gradients (da, db, dv, dgamma) from saved (out, lse); loops key blocks outside, query blocks inside."""
  len_q, len_k = a.shape[2], b.shape[2]
  num_q, num_k = len_q // block_q, len_k // block_k
  g = gamma.astype(jnp.float32)[:, None, None]
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, H, Lq)

  def key_block(carry, j):
    da, dgamma = carry
    b_j, v_j = _slice(b, j, block_k), _slice(v, j, block_k)

    def query_step(i, inner):
      db_j, dv_j, da, dgamma = inner
      a_i, do_i = _slice(a, i, block_q), _slice(dout, i, block_q)
      lse_i = jax.lax.dynamic_slice_in_dim(lse, i * block_q, block_q, axis=2)
      delta_i = jax.lax.dynamic_slice_in_dim(delta, i * block_q, block_q, axis=2)
      x = jnp.einsum("bhqd,bhkd->bhqk", a_i, b_j, preferred_element_type=jnp.float32)
      s, ds_dx, ds_dgamma = tile_logits_and_slopes(x, g, transform)
      mask = causal_block_mask(i * block_q, j * block_k, block_q, block_k)
      p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
      dv_j = dv_j + jnp.einsum("bhqk,bhqd->bhkd", p.astype(v.dtype), do_i, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bhqd,bhkd->bhqk", do_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None])
      dx = (ds * ds_dx).astype(a.dtype)
      da_i = jnp.einsum("bhqk,bhkd->bhqd", dx, b_j, preferred_element_type=jnp.float32)
      da = jax.lax.dynamic_update_slice_in_dim(da, _slice(da, i, block_q) + da_i, i * block_q, axis=2)
      db_j = db_j + jnp.einsum("bhqk,bhqd->bhkd", dx, a_i, preferred_element_type=jnp.float32)
      dgamma = dgamma + jnp.sum(ds * ds_dgamma, axis=(0, 2, 3))
      return db_j, dv_j, da, dgamma

    zeros_k = jnp.zeros(b_j.shape, jnp.float32)
    db_j, dv_j, da, dgamma = jax.lax.fori_loop(first_query_block(j, block_q, block_k), num_q, query_step,
                                               (zeros_k, zeros_k, da, dgamma))
    return (da, dgamma), (db_j, dv_j)

  init = (jnp.zeros(a.shape, jnp.float32), jnp.zeros(gamma.shape, jnp.float32))
  (da, dgamma), (db, dv) = jax.lax.scan(key_block, init, jnp.arange(num_k))
  def unblock(x):  # (nk, B, H, bk, hd) -> (B, H, Lk, hd)
    return jnp.moveaxis(x, 0, 2).reshape(b.shape)
  return da.astype(a.dtype), unblock(db).astype(b.dtype), unblock(dv).astype(v.dtype), dgamma.astype(gamma.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(a, b, v, gamma, transform, block_q, block_k):
  return _forward(a, b, v, gamma, transform, block_q, block_k)[0]


def _flash_fwd(a, b, v, gamma, transform, block_q, block_k):
  out, lse = _forward(a, b, v, gamma, transform, block_q, block_k)
  return out, (a, b, v, gamma, out, lse)


def _flash_bwd(transform, block_q, block_k, residuals, dout):
  a, b, v, gamma, out, lse = residuals
  return _backward(a, b, v, gamma, out, lse, dout, transform, block_q, block_k)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x: jax.Array, multiple: int) -> jax.Array:
  """Zero-pads axis 2 of (B, H, L, hd) up to a multiple."""
  extra = -x.shape[2] % multiple
  return jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) if extra else x


def effective_blocks(length: int, block_q: int, block_k: int) -> tuple[int, int]:
  """Block sizes no longer than the sequence (a short sequence is one block, unpadded)."""
  return min(block_q, length), min(block_k, length)


def causal_attention_blockwise(a: jax.Array, b: jax.Array, v: jax.Array, gamma: jax.Array, *,
                               transform: str, block_q: int = 128, block_k: int = 128) -> jax.Array:
  """softmax_j(g_h(a_i . b_j)) v_j over keys j <= i. a, b, v (B, L, H, hd), gamma (H,) -> (B, L, H, hd) in v's dtype."""
  if transform not in TRANSFORMS:
    raise ValueError(f"transform={transform!r}: must be one of {TRANSFORMS}")
  length = a.shape[1]
  block_q, block_k = effective_blocks(length, block_q, block_k)
  a, b, v = (jnp.swapaxes(x, 1, 2) for x in (a, b, v))
  out = _flash(_pad_to(a, block_q), _pad_to(b, block_k), _pad_to(v, block_k), gamma, transform, block_q, block_k)
  return jnp.swapaxes(out[:, :, :length], 1, 2)


def geo_attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, gamma: jax.Array, *,
                            block_q: int = 128, block_k: int = 128) -> jax.Array:
  """Causal Fisher-Rao attention, blockwise; same contract as geo_attention_reference."""
  dtype = v.dtype
  return causal_attention_blockwise(sqrt_probs(q).astype(dtype), sqrt_probs(k).astype(dtype), v, gamma,
                                    transform="geo", block_q=block_q, block_k=block_k)


def dot_attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *,
                            block_q: int = 128, block_k: int = 128) -> jax.Array:
  """Causal scaled dot-product attention, blockwise; same contract as dot_attention_reference."""
  scale = jnp.full((q.shape[2],), q.shape[-1] ** -0.5, jnp.float32)
  return causal_attention_blockwise(q, k, v, scale, transform="dot", block_q=block_q, block_k=block_k)

