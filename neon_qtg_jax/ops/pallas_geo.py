"""Causal Fisher-Rao attention as Pallas kernels (forward, and a two-kernel backward).

Written against Pallas's Triton backend (`jax.experimental.pallas.triton`) rather than
Mosaic GPU: a Triton-backend kernel also runs in Pallas interpret mode, so the same kernel
body is tested on CPU against the blockwise JAX version (blockwise_geo.py), which stays
the fallback and the oracle. The tile math (score transform, its slopes, the causal mask,
the block bounds) is imported from blockwise_geo.py, so both paths compute it alike.

One program handles one (query or key block, batch row, head); each loop runs in two parts,
the blocks wholly below the diagonal without a mask and those crossing it with one:
  forward  grid (nq, B, H): online softmax over key blocks 0 .. diagonal; writes out, lse
  dkv      grid (nk, B, H): loops query blocks diagonal .. end; writes dk~, dv
  dq       grid (nq, B, H): loops key blocks 0 .. diagonal; writes dq~ and a partial dgamma
Block sizes must be powers of two >= 16 (Triton's dot); sequences are zero-padded to whole
blocks, and padded keys lie above every real query's diagonal. head_dim must be a power
of two >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from neon_qtg_jax.ops.blockwise_geo import (causal_block_mask, first_query_block, first_unmasked_query_block,
                                            key_blocks_up_to, tile_logits, tile_logits_and_slopes,
                                            unmasked_key_blocks)
from neon_qtg_jax.ops.geo_attention import MASK_VALUE, sqrt_probs

TRANSFORM = "arccos_sq"


def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """float32-accumulated tile product; float32 operands stay float32 (no TF32 rounding)."""
  exact = a.dtype == jnp.float32 and b.dtype == jnp.float32
  return pl.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=False if exact else None)


def _forward_kernel(a_ref, b_ref, v_ref, gamma_ref, out_ref, lse_ref, *, block_q: int, block_k: int):
  i = pl.program_id(0)
  a = a_ref[...]
  gamma = gamma_ref[...]

  def key_step(j, carry, masked):
    acc, row_max, row_sum = carry
    rows = pl.ds(j * block_k, block_k)
    x = _dot(a, b_ref[rows, :], trans_b=True)
    s = tile_logits(x, gamma, TRANSFORM)
    if masked:  # only the blocks crossing the diagonal
      s = jnp.where(causal_block_mask(i * block_q, j * block_k, block_q, block_k), s, MASK_VALUE)
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    p = jnp.exp(s - new_max[:, None])
    rescale = jnp.exp(row_max - new_max)
    v = v_ref[rows, :]
    acc = rescale[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, new_max, rescale * row_sum + jnp.sum(p, axis=1)

  num_k = b_ref.shape[0] // block_k
  init = (jnp.zeros(a.shape, jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  whole = unmasked_key_blocks(i, block_q, block_k, num_k)
  carry = jax.lax.fori_loop(0, whole, functools.partial(key_step, masked=False), init)
  acc, row_max, row_sum = jax.lax.fori_loop(whole, key_blocks_up_to(i, block_q, block_k, num_k),
                                            functools.partial(key_step, masked=True), carry)
  out_ref[...] = (acc / row_sum[:, None]).astype(out_ref.dtype)
  lse_ref[...] = row_max + jnp.log(row_sum)


def _tile_grads(a, b, v, dout, lse, delta, gamma, q_block, k_block, block_q, block_k, masked):
  """Recomputes one (block_q, block_k) tile; returns (p, ds * dg/dgamma, dx) for the gradient products."""
  x = _dot(a, b, trans_b=True)
  s, ds_dx, ds_dgamma = tile_logits_and_slopes(x, gamma, TRANSFORM)
  p = jnp.exp(s - lse[:, None])
  if masked:
    p = jnp.where(causal_block_mask(q_block * block_q, k_block * block_k, block_q, block_k), p, 0.0)
  ds = p * (_dot(dout, v, trans_b=True) - delta[:, None])
  return p, ds * ds_dgamma, (ds * ds_dx).astype(a.dtype)


def _dkv_kernel(a_ref, b_ref, v_ref, gamma_ref, dout_ref, lse_ref, delta_ref, db_ref, dv_ref, *,
                block_q: int, block_k: int):
  j = pl.program_id(0)
  b, v = b_ref[...], v_ref[...]
  gamma = gamma_ref[...]

  def query_step(i, carry, masked):
    db, dv = carry
    rows = pl.ds(i * block_q, block_q)
    a, dout = a_ref[rows, :], dout_ref[rows, :]
    p, _, dx = _tile_grads(a, b, v, dout, lse_ref[rows], delta_ref[rows], gamma, i, j, block_q, block_k, masked)
    dv = dv + _dot(p.astype(dout.dtype), dout, trans_a=True)
    return db + _dot(dx, a, trans_a=True), dv

  num_q = a_ref.shape[0] // block_q
  zeros = jnp.zeros(b.shape, jnp.float32)
  whole_from = first_unmasked_query_block(j, block_q, block_k, num_q)
  carry = jax.lax.fori_loop(first_query_block(j, block_q, block_k), whole_from,
                            functools.partial(query_step, masked=True), (zeros, zeros))
  db, dv = jax.lax.fori_loop(whole_from, num_q, functools.partial(query_step, masked=False), carry)
  db_ref[...] = db.astype(db_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(a_ref, b_ref, v_ref, gamma_ref, dout_ref, lse_ref, delta_ref, da_ref, dgamma_ref, *,
               block_q: int, block_k: int):
  i = pl.program_id(0)
  a, dout, lse, delta = a_ref[...], dout_ref[...], lse_ref[...], delta_ref[...]
  gamma = gamma_ref[...]

  def key_step(j, carry, masked):
    da, dgamma = carry
    rows = pl.ds(j * block_k, block_k)
    b = b_ref[rows, :]
    _, ds_gamma, dx = _tile_grads(a, b, v_ref[rows, :], dout, lse, delta, gamma, i, j, block_q, block_k, masked)
    return da + _dot(dx, b), dgamma + jnp.sum(ds_gamma)

  num_k = b_ref.shape[0] // block_k
  whole = unmasked_key_blocks(i, block_q, block_k, num_k)
  carry = jax.lax.fori_loop(0, whole, functools.partial(key_step, masked=False),
                            (jnp.zeros(a.shape, jnp.float32), jnp.float32(0.0)))
  da, dgamma = jax.lax.fori_loop(whole, key_blocks_up_to(i, block_q, block_k, num_k),
                                 functools.partial(key_step, masked=True), carry)
  da_ref[...] = da.astype(da_ref.dtype)
  dgamma_ref[...] = dgamma


def kernel_blocks(length: int, block_q: int, block_k: int) -> tuple[int, int]:
  """Block sizes for a sequence: powers of two >= 16, no longer than the padded sequence needs."""
  for name, block in (("model.block_q", block_q), ("model.block_k", block_k)):
    if block < 16 or block & (block - 1):
      raise ValueError(f"{name}={block}: the Pallas kernel needs a power of two >= 16")
  fit = max(16, pl.next_power_of_2(length))
  return min(block_q, fit), min(block_k, fit)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(a, b, v, gamma, block_q, block_k, backward_block, interpret):
  return _forward(a, b, v, gamma, block_q, block_k, interpret)[0]


def _forward(a, b, v, gamma, block_q, block_k, interpret):
  """a, b, v (B, L, H, hd) with L whole blocks -> (out (B, L, H, hd), lse (B, H, L) float32)."""
  batch, length, heads, head_dim = a.shape
  grid = (length // block_q, batch, heads)
  q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda i, bi, h: (bi, i, h, 0))
  sequence = pl.BlockSpec((None, length, None, head_dim), lambda i, bi, h: (bi, 0, h, 0))
  head_scalar = pl.BlockSpec((None,), lambda i, bi, h: (h,))
  return pl.pallas_call(
      functools.partial(_forward_kernel, block_q=block_q, block_k=block_k),
      grid=grid,
      in_specs=[q_block, sequence, sequence, head_scalar],
      out_specs=[q_block, pl.BlockSpec((None, None, block_q), lambda i, bi, h: (bi, h, i))],
      out_shape=[jax.ShapeDtypeStruct(a.shape, v.dtype), jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      compiler_params=plt.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
      interpret=interpret,
      name="geo_attention_forward",
  )(a, b, v, gamma.astype(jnp.float32))


def _attention_fwd(a, b, v, gamma, block_q, block_k, backward_block, interpret):
  out, lse = _forward(a, b, v, gamma, block_q, block_k, interpret)
  return out, (a, b, v, gamma, out, lse)


def _attention_bwd(block_q, block_k, block, interpret, residuals, dout):
  """Backward with square blocks of size `block` (smaller than the forward's: more live tiles)."""
  a, b, v, gamma, out, lse = residuals
  batch, length, heads, head_dim = a.shape
  delta = jnp.swapaxes(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), 1, 2)
  num_blocks = length // block
  params = plt.CompilerParams(num_warps=8, num_stages=2)
  blocked = pl.BlockSpec((None, block, None, head_dim), lambda n, bi, h: (bi, n, h, 0))
  sequence = pl.BlockSpec((None, length, None, head_dim), lambda n, bi, h: (bi, 0, h, 0))
  head_scalar = pl.BlockSpec((None,), lambda n, bi, h: (h,))
  row_block = pl.BlockSpec((None, None, block), lambda n, bi, h: (bi, h, n))
  rows = pl.BlockSpec((None, None, length), lambda n, bi, h: (bi, h, 0))
  gamma = gamma.astype(jnp.float32)
  db, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=block, block_k=block),
      grid=(num_blocks, batch, heads),
      in_specs=[sequence, blocked, blocked, head_scalar, sequence, rows, rows],
      out_specs=[blocked, blocked],
      out_shape=[jax.ShapeDtypeStruct(b.shape, b.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=interpret, name="geo_attention_dkv",
  )(a, b, v, gamma, dout, lse, delta)
  da, dgamma = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=block, block_k=block),
      grid=(num_blocks, batch, heads),
      in_specs=[blocked, sequence, sequence, head_scalar, blocked, row_block, row_block],
      out_specs=[blocked, pl.BlockSpec((None, None, None), lambda n, bi, h: (n, bi, h))],
      out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype),
                 jax.ShapeDtypeStruct((num_blocks, batch, heads), jnp.float32)],
      compiler_params=params, interpret=interpret, name="geo_attention_dq",
  )(a, b, v, gamma, dout, lse, delta)
  return da, db, dv, jnp.sum(dgamma, axis=(0, 1)).astype(residuals[3].dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def geo_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, gamma: jax.Array, *, block_q: int = 128,
                         block_k: int = 128, backward_block: int = 64, interpret: bool = False) -> jax.Array:
  """Causal Fisher-Rao attention; same contract as geo_attention_reference.

  q, k, v (B, L, H, hd), gamma (H,) -> (B, L, H, hd) in v's dtype. interpret=True runs the
  kernels in Pallas interpret mode (any backend, slow: for tests).
  """
  head_dim = q.shape[-1]
  if head_dim < 16 or head_dim & (head_dim - 1):
    raise ValueError(f"head_dim={head_dim} (model.embed_dim / model.num_heads): the Pallas kernel needs a "
                     "power of two >= 16; use model.attention_impl='blockwise'")
  length = q.shape[1]
  block_q, block_k = kernel_blocks(length, block_q, block_k)
  backward_block = min(kernel_blocks(length, backward_block, backward_block)[0], block_q, block_k)
  padded = -length % max(block_q, block_k)
  def pad(x):
    return jnp.pad(x, ((0, 0), (0, padded), (0, 0), (0, 0))) if padded else x
  dtype = v.dtype
  a, b = sqrt_probs(q).astype(dtype), sqrt_probs(k).astype(dtype)
  out = _attention(pad(a), pad(b), pad(v), gamma, block_q, block_k, backward_block, interpret)
  return out[:, :length]
