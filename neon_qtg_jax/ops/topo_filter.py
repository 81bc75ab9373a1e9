"""Causal 0-dimensional persistence (TopoFilter): reference implementation.

s_t = min_{s<t} ||phi_t - phi_s|| (s_0 = 0) for unit states phi, computed per sequence from
inner products (||a - b||^2 = 2 - 2 a.b for unit a, b); no (L, L, 2d) tensor is built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SQRT_GUARD = 1e-12


def unit_states(psi: jax.Array, eps: float) -> jax.Array:
  """phi = psi / max(||psi||, eps) over the last axis, in float32."""
  psi = psi.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(psi * psi, axis=-1, keepdims=True))
  return psi / jnp.maximum(norm, eps)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt(max(x, 0)) whose gradient is 0 (not inf) where x <= SQRT_GUARD."""
  positive = x > SQRT_GUARD
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def persistence_weights(s: jax.Array, threshold: float, tau: float) -> jax.Array:
  """w_t = exp(-max(s_t - threshold, 0) / tau)."""
  return jnp.exp(-jnp.maximum(s - threshold, 0.0) / tau)


def k_smallest_mean(sq_dist: jax.Array, valid: jax.Array, k: int) -> jax.Array:
  """Mean of the k smallest distances per row among valid entries (fewer if fewer are valid).

  sq_dist, valid: (..., Lq, Lk) squared distances and mask. Rows without valid entries give 0.
  """
  if k == 1:
    smallest = jnp.min(jnp.where(valid, sq_dist, jnp.inf), axis=-1)
    return jnp.where(jnp.any(valid, axis=-1), safe_sqrt(jnp.where(jnp.isinf(smallest), 0.0, smallest)), 0.0)
  neg_top, idx = jax.lax.top_k(jnp.where(valid, -sq_dist, -jnp.inf), k)
  taken = jnp.take_along_axis(valid, idx, axis=-1)
  dist = safe_sqrt(jnp.where(taken, -neg_top, 0.0))
  count = jnp.sum(taken, axis=-1)
  return jnp.where(count > 0, jnp.sum(jnp.where(taken, dist, 0.0), axis=-1) / jnp.maximum(count, 1), 0.0)


def topo_persistence_reference(psi: jax.Array, *, k: int = 1, eps: float = 1e-6) -> jax.Array:
  """s_t for psi (B, L, 2d) -> (B, L) float32, each sequence on its own."""
  phi = unit_states(psi, eps)
  gram = jnp.einsum("bqc,bkc->bqk", phi, phi)
  sq_dist = jnp.maximum(2.0 - 2.0 * gram, 0.0)
  length = psi.shape[1]
  strictly_before = jnp.arange(length)[None, :] < jnp.arange(length)[:, None]
  return k_smallest_mean(sq_dist, strictly_before[None], k)
