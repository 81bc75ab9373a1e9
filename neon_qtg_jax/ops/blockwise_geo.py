"""Blockwise (flash-style) causal attention with an exact custom backward pass.

One loop serves every attention kind whose score is an elementwise transform g_h of the tile
x = a_i . b_j of two operands (the kinds in model/attention/ choose the operands):
  "arccos_sq": g_h(x) = -gamma_h arccos(x)^2  (geo: a, b = q~, k~, square-root probabilities)
  "linear":    g_h(x) = gamma_h x             (dot: a, b = q, k with gamma_h = hd^-0.5; cosine)
followed by a causal softmax over keys and the value sum. The forward pass keeps a running
max and sum per query row (online softmax) and saves only the output and the row
log-sum-exp; the backward pass recomputes each tile. Only one (B, H, block_q, block_k)
tile of the L x L matrix is alive at a time, key blocks above the diagonal are skipped,
only blocks crossing the diagonal are masked, and the x tile is float32 whatever the
operand dtype (bf16 allowed).

Layout: q, k, v are (B, L, H, hd) as for the references in geo_attention.py, kept so (no
transposed copies), zero-padded to whole blocks (padded keys lie above the diagonal of
every real query, so causality masks them). Outputs and gradients are written block by
block in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from neon_qtg_jax.ops.arccos_sq import arccos_sq
from neon_qtg_jax.ops.geo_attention import MASK_VALUE, sqrt_probs

TRANSFORMS = ("arccos_sq", "linear")


def tile_logits(x: jax.Array, gamma: jax.Array, transform: str) -> jax.Array:
  """Scores g(x) of a float32 tile x; gamma broadcasts against x (e.g. (H, 1, 1) or a scalar)."""
  if transform == "arccos_sq":
    return -gamma * arccos_sq(x)
  return gamma * x


def tile_logits_and_slopes(x: jax.Array, gamma: jax.Array,
                           transform: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(g(x), dg/dx, dg/dgamma) of a float32 tile, elementwise.

  The geo slope is arccos_sq's own custom derivative (finite at x = 1), taken through jvp.
  """
  if transform == "arccos_sq":
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


def unmasked_key_blocks(q_block: jax.Array, block_q: int, block_k: int, num_k_blocks: int) -> jax.Array:
  """Number of leading key blocks every query of q_block sees whole (no causal mask needed)."""
  first_query = jnp.asarray(q_block * block_q + 1, jnp.int32)
  return jnp.minimum(jax.lax.div(first_query, jnp.int32(block_k)), num_k_blocks)


def first_unmasked_query_block(k_block: jax.Array, block_q: int, block_k: int, num_q_blocks: int) -> jax.Array:
  """First query block whose every query sees all of k_block (no causal mask needed)."""
  last_key_rounded_up = jnp.asarray((k_block + 1) * block_k - 1 + block_q - 1, jnp.int32)
  return jnp.minimum(jax.lax.div(last_key_rounded_up, jnp.int32(block_q)), num_q_blocks)


def _rows(x: jax.Array, block: jax.Array, size: int, axis: int = 1) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, block * size, size, axis=axis)


def _put_rows(x: jax.Array, update: jax.Array, block: jax.Array, size: int, axis: int = 1) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(x, update.astype(x.dtype), block * size, axis=axis)


def _forward(a: jax.Array, b: jax.Array, v: jax.Array, gamma: jax.Array, transform: str,
             block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
  """a (B, Lq, H, w), b (B, Lk, H, w) and v (B, Lk, H, hd), Lq and Lk whole blocks -> (out (B, Lq, H, hd) in
  v's dtype, lse (B, H, Lq)). The operands' width w may differ from the values' hd."""
  batch, len_q, heads, _ = a.shape
  head_dim = v.shape[-1]
  num_q, num_k = len_q // block_q, b.shape[1] // block_k
  g = gamma.astype(jnp.float32)[:, None, None]

  def query_block(i, carry):
    out, lse = carry
    a_i = _rows(a, i, block_q)

    def key_step(j, inner, masked):
      acc, row_max, row_sum = inner
      x = jnp.einsum("bqhd,bkhd->bhqk", a_i, _rows(b, j, block_k), preferred_element_type=jnp.float32)
      s = tile_logits(x, g, transform)
      if masked:  # only the blocks crossing the diagonal
        s = jnp.where(causal_block_mask(i * block_q, j * block_k, block_q, block_k), s, MASK_VALUE)
      new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
      p = jnp.exp(s - new_max[..., None])
      rescale = jnp.exp(row_max - new_max)
      row_sum = rescale * row_sum + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), _rows(v, j, block_k),
                      preferred_element_type=jnp.float32)
      return rescale[..., None] * acc + pv, new_max, row_sum

    init = (jnp.zeros((batch, heads, block_q, head_dim), jnp.float32),
            jnp.full((batch, heads, block_q), MASK_VALUE, jnp.float32),
            jnp.zeros((batch, heads, block_q), jnp.float32))
    whole = unmasked_key_blocks(i, block_q, block_k, num_k)
    carry = jax.lax.fori_loop(0, whole, functools.partial(key_step, masked=False), init)
    acc, row_max, row_sum = jax.lax.fori_loop(whole, key_blocks_up_to(i, block_q, block_k, num_k),
                                              functools.partial(key_step, masked=True), carry)
    out = _put_rows(out, jnp.swapaxes(acc / row_sum[..., None], 1, 2), i, block_q)
    return out, _put_rows(lse, row_max + jnp.log(row_sum), i, block_q, axis=2)

  init = (jnp.zeros(a.shape[:-1] + (head_dim,), v.dtype), jnp.zeros((batch, heads, len_q), jnp.float32))
  return jax.lax.fori_loop(0, num_q, query_block, init)


def _backward(a, b, v, gamma, out, lse, dout, transform, block_q, block_k):
  """Gradients (da, db, dv, dgamma) from saved (out, lse); loops key blocks outside, query blocks inside.

  db and dv of a key block are complete after its inner loop and written in place; da is
  accumulated over key blocks in float32.
  """
  num_q, num_k = a.shape[1] // block_q, b.shape[1] // block_k
  g = gamma.astype(jnp.float32)[:, None, None]
  delta = jnp.einsum("bqhd,bqhd->bhq", dout, out, preferred_element_type=jnp.float32)

  def key_block(j, carry):
    da, db, dv, dgamma = carry
    b_j, v_j = _rows(b, j, block_k), _rows(v, j, block_k)

    def query_step(i, inner, masked):
      db_j, dv_j, da, dgamma = inner
      a_i, do_i = _rows(a, i, block_q), _rows(dout, i, block_q)
      lse_i, delta_i = _rows(lse, i, block_q, axis=2), _rows(delta, i, block_q, axis=2)
      x = jnp.einsum("bqhd,bkhd->bhqk", a_i, b_j, preferred_element_type=jnp.float32)
      s, ds_dx, ds_dgamma = tile_logits_and_slopes(x, g, transform)
      p = jnp.exp(s - lse_i[..., None])
      if masked:
        p = jnp.where(causal_block_mask(i * block_q, j * block_k, block_q, block_k), p, 0.0)
      dv_j = dv_j + jnp.einsum("bhqk,bqhd->bkhd", p.astype(v.dtype), do_i, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqhd,bkhd->bhqk", do_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None])
      dx = (ds * ds_dx).astype(a.dtype)
      da_i = jnp.einsum("bhqk,bkhd->bqhd", dx, b_j, preferred_element_type=jnp.float32)
      da = _put_rows(da, _rows(da, i, block_q) + da_i, i, block_q)
      db_j = db_j + jnp.einsum("bhqk,bqhd->bkhd", dx, a_i, preferred_element_type=jnp.float32)
      return db_j, dv_j, da, dgamma + jnp.sum(ds * ds_dgamma, axis=(0, 2, 3))

    zeros = (jnp.zeros(b_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32))
    whole_from = first_unmasked_query_block(j, block_q, block_k, num_q)
    inner = jax.lax.fori_loop(first_query_block(j, block_q, block_k), whole_from,
                              functools.partial(query_step, masked=True), (*zeros, da, dgamma))
    db_j, dv_j, da, dgamma = jax.lax.fori_loop(whole_from, num_q, functools.partial(query_step, masked=False),
                                               inner)
    return da, _put_rows(db, db_j, j, block_k), _put_rows(dv, dv_j, j, block_k), dgamma

  init = (jnp.zeros(a.shape, jnp.float32), jnp.zeros(b.shape, b.dtype), jnp.zeros(v.shape, v.dtype),
          jnp.zeros(gamma.shape, jnp.float32))
  da, db, dv, dgamma = jax.lax.fori_loop(0, num_k, key_block, init)
  return da.astype(a.dtype), db, dv, dgamma.astype(gamma.dtype)


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
  """Zero-pads axis 1 of (B, L, H, hd) up to a multiple."""
  extra = -x.shape[1] % multiple
  return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x


def effective_blocks(length: int, block_q: int, block_k: int) -> tuple[int, int]:
  """Block sizes no longer than the sequence (a short sequence is one block, unpadded)."""
  return min(block_q, length), min(block_k, length)


def causal_attention_blockwise(a: jax.Array, b: jax.Array, v: jax.Array, gamma: jax.Array, *,
                               transform: str, block_q: int = 128, block_k: int = 128) -> jax.Array:
  """softmax_j(g_h(a_i . b_j)) v_j over keys j <= i. a, b (B, L, H, w), v (B, L, H, hd), gamma (H,) -> (B, L, H, hd)
  in v's dtype."""
  if transform not in TRANSFORMS:
    raise ValueError(f"transform={transform!r}: must be one of {TRANSFORMS}")
  length = a.shape[1]
  block_q, block_k = effective_blocks(length, block_q, block_k)
  out = _flash(_pad_to(a, block_q), _pad_to(b, block_k), _pad_to(v, block_k), gamma, transform, block_q, block_k)
  return out[:, :length]


def geo_attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, gamma: jax.Array, *,
                            block_q: int = 128, block_k: int = 128) -> jax.Array:
  """Causal Fisher-Rao attention, blockwise; same contract as geo_attention_reference."""
  dtype = v.dtype
  return causal_attention_blockwise(sqrt_probs(q).astype(dtype), sqrt_probs(k).astype(dtype), v, gamma,
                                    transform="arccos_sq", block_q=block_q, block_k=block_k)


def dot_attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *,
                            block_q: int = 128, block_k: int = 128) -> jax.Array:
  """Causal scaled dot-product attention, blockwise; same contract as dot_attention_reference."""
  scale = jnp.full((q.shape[2],), q.shape[-1] ** -0.5, jnp.float32)
  return causal_attention_blockwise(q, k, v, scale, transform="linear", block_q=block_q, block_k=block_k)

