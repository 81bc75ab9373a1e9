"""Fisher-Rao (Bhattacharyya-angle) attention and scaled dot-product attention: references.

Layout: q, k, v are (B, L, H, hd); outputs are (B, L, H, hd). At most one (B, H, L, L)
array is alive; the spec's (B, H, L, L, hd) tensor is never built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neon_qtg_jax.ops.arccos_sq import arccos_sq

# Finite stand-in for -inf in masked scores: exp() of it underflows to exactly 0 and it
# never produces inf - inf = nan in the softmax.
MASK_VALUE = -1e30


def sqrt_probs(x: jax.Array) -> jax.Array:
  """Maps (..., hd) vectors to the unit sphere of square-root probabilities, in float32."""
  return jnp.exp(0.5 * jax.nn.log_softmax(x.astype(jnp.float32), axis=-1))


def geo_scores(q_sphere: jax.Array, k_sphere: jax.Array, gamma: jax.Array) -> jax.Array:
  """Scores -gamma_h * arccos(BC)^2 for sphere points (B, Lq, H, hd), (B, Lk, H, hd) -> (B, H, Lq, Lk).

  BC is accumulated in float32 whatever the operand dtype; gamma is (H,).
  """
  bc = jnp.einsum("bqhd,bkhd->bhqk", q_sphere, k_sphere, preferred_element_type=jnp.float32)
  return -gamma.astype(jnp.float32)[None, :, None, None] * arccos_sq(bc)


def causal_mask(len_q: int, len_k: int, q_offset: int | jax.Array = 0) -> jax.Array:
  """(Lq, Lk) bool mask, True where key j <= query position q_offset + i."""
  q_pos = jnp.arange(len_q)[:, None] + q_offset
  return jnp.arange(len_k)[None, :] <= q_pos


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax over keys of scores (B, H, Lq, Lk) under mask (broadcastable): the attention probabilities."""
  return jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1)


def masked_softmax_values(scores: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax over keys of scores (B, H, Lq, Lk) under mask (broadcastable), applied to v (B, Lk, H, hd)."""
  probs = masked_softmax(scores, mask)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(v.dtype)


def geo_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, gamma: jax.Array,
                            mask: jax.Array | None = None) -> jax.Array:
  """Causal Fisher-Rao attention: softmax_j(-gamma_h arccos(q~_i . k~_j)^2) V_j.

  q, k, v: (B, L, H, hd); gamma: (H,) positive. mask: optional (B or 1, 1, Lq, Lk) bool,
  default causal.
  """
  dtype = v.dtype
  q_sphere, k_sphere = sqrt_probs(q).astype(dtype), sqrt_probs(k).astype(dtype)
  scores = geo_scores(q_sphere, k_sphere, gamma)
  if mask is None:
    mask = causal_mask(q.shape[1], k.shape[1])
  return masked_softmax_values(scores, v, mask)


def dot_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                            mask: jax.Array | None = None) -> jax.Array:
  """Causal scaled dot-product attention with the same heads: (B, L, H, hd) -> (B, L, H, hd)."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is None:
    mask = causal_mask(q.shape[1], k.shape[1])
  return masked_softmax_values(scores, v, mask)
