"""`cosine`: the second-order twin of `geo`, the control arm that isolates what the exact geometry adds.

The same parameters and inputs as `geo` (gamma_h, and beta_h for the scaled and normed sphere maps):
with a = q~ and b = k~ what geo's sphere map receives (beta_h q / rms(q) by default),

  score = -(gamma_h / 4) Var_d(a - b),   Var_d the variance over head_dim.

This is the second-order expansion of geo's -gamma_h arccos(BC)^2: log BC ~ -Var_d(a - b) / 8 and
arccos(x)^2 ~ 2 (1 - x) near x = 1. With a, b centred (a_c = a - mean_d a) it is

  -(gamma_h / (4 hd)) (|a_c|^2 + |b_c|^2 - 2 a_c . b_c),

a centred cosine similarity with temperature gamma_h beta_h^2 / 2 when |a_c|, |b_c| ~ beta_h sqrt(hd)
(the normed map with mean near 0), up to the per-query |a_c|^2 the softmax ignores.
The decode cache stores b_c. Paths: the reference, and the blockwise loop through the operands
[a_c, 1] . [b_c, -|b_c|^2 / 2] with the linear transform and scale gamma_h / (2 hd) (the per-query term
dropped); `pallas` runs blockwise (the kernel's score function is geo's, and the operands are hd + 1
wide).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from neon_qtg_jax.model.attention.base import register
from neon_qtg_jax.model.attention.geo import Geo, pair_quantiles, score_range
from neon_qtg_jax.ops import blockwise_geo


def centred(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  x = x.astype(jnp.float32)
  return (x - jnp.mean(x, axis=-1, keepdims=True)).astype(dtype)


def cosine_scores(a: jax.Array, b: jax.Array, gamma: jax.Array) -> jax.Array:
  """-(gamma_h / 4) Var_d(a - b) for centred a (B, Lq, H, hd), b (B, Lk, H, hd) -> (B, H, Lq, Lk) float32."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  cross = jnp.einsum("bqhd,bkhd->bhqk", a, b, preferred_element_type=jnp.float32)
  a_sq = jnp.swapaxes(jnp.sum(a * a, axis=-1), 1, 2)[..., :, None]  # (B, H, Lq, 1)
  b_sq = jnp.swapaxes(jnp.sum(b * b, axis=-1), 1, 2)[..., None, :]  # (B, H, 1, Lk)
  variance = (a_sq + b_sq - 2.0 * cross) / a.shape[-1]
  return -(gamma.astype(jnp.float32)[None, :, None, None] / 4.0) * variance


def cosine_attention_blockwise(a: jax.Array, b: jax.Array, v: jax.Array, gamma: jax.Array, *,
                               block_q: int, block_k: int) -> jax.Array:
  """Causal cosine attention on centred operands through the blockwise loop (linear transform)."""
  head_dim = a.shape[-1]
  b32 = b.astype(jnp.float32)
  a_ext = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
  b_ext = jnp.concatenate([b, (-0.5 * jnp.sum(b32 * b32, axis=-1, keepdims=True)).astype(b.dtype)], axis=-1)
  scale = gamma.astype(jnp.float32) / (2.0 * head_dim)
  return blockwise_geo.causal_attention_blockwise(a_ext, b_ext, v, scale, transform="linear", block_q=block_q,
                                                  block_k=block_k)


class Cosine(Geo):
  name = "cosine"
  display_name = "cosine (second-order Fisher-Rao)"

  def query(self, q: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return centred(q, dtype)

  def key(self, k: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return centred(k, dtype)

  def scores(self, a: jax.Array, b: jax.Array, p: Any) -> jax.Array:
    return cosine_scores(a, b, p)

  def attend(self, q, k, v, p, *, impl, block_q, block_k):
    if impl in ("blockwise", "pallas"):
      dtype = v.dtype
      return cosine_attention_blockwise(self.query(q, dtype), self.key(k, dtype), v, p, block_q=block_q,
                                        block_k=block_k)
    if impl == "reference":
      return self.reference(q, k, v, p)
    raise ValueError(f"model.attention_impl={impl!r} is not available for attention={self.name!r}")

  def diagnostics(self, q: jax.Array, k: jax.Array, p: Any, mask: jax.Array) -> dict[str, jax.Array]:
    """Quantiles of (gamma / 4) Var_d(a - b) (the negated score) over causal pairs, and the score range."""
    scores = cosine_scores(centred(q, jnp.float32), centred(k, jnp.float32), p)
    return {"gamma_var_quantiles": pair_quantiles(-scores, mask), "score_range": score_range(scores, mask)}


COSINE = register(Cosine())
