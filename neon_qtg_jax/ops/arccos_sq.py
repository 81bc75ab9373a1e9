"""arccos(x)^2 with a finite, accurate value and derivative on all of [0, 1].

d/dx arccos(x)^2 = -2 arccos(x) / sqrt(1 - x^2), a 0/0 limit at x = 1 whose value is -2.
Writing x = cos(theta), the ratio is theta / sin(theta) = 1 + t/3 + 2 t^2/15 + O(t^3) with
t = 1 - x, which the derivative uses for t below SERIES_BELOW.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SERIES_BELOW = 1e-3


def stable_arccos(x: jax.Array) -> jax.Array:
  """arccos on [0, 1], accurate near 1: 2 atan2(sqrt(1 - x), sqrt(1 + x)); 1 - x is exact there."""
  return 2.0 * jnp.arctan2(jnp.sqrt(1.0 - x), jnp.sqrt(1.0 + x))


def _theta_over_sin(x: jax.Array) -> jax.Array:
  t = 1.0 - x
  near_one = t < SERIES_BELOW
  safe_x = jnp.where(near_one, 0.5, x)  # keeps the unused branch finite (and its gradient)
  direct = stable_arccos(safe_x) / jnp.sqrt((1.0 - safe_x) * (1.0 + safe_x))
  series = 1.0 + t / 3.0 + (2.0 / 15.0) * t * t
  return jnp.where(near_one, series, direct)


@jax.custom_jvp
def arccos_sq(x: jax.Array) -> jax.Array:
  """arccos(clip(x, 0, 1))^2, elementwise. Derivative is -2 at x = 1 and 0 above 1."""
  theta = stable_arccos(jnp.clip(x, 0.0, 1.0))
  return theta * theta


@arccos_sq.defjvp
def _arccos_sq_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  clipped = jnp.clip(x, 0.0, 1.0)
  theta = stable_arccos(clipped)
  slope = jnp.where(x > 1.0, 0.0, -2.0 * _theta_over_sin(clipped))
  return theta * theta, slope * dx


def arccos_sq_reference(x):
  """Plain NumPy-style formula for tests: arccos(clip(x))^2."""
  return jnp.arccos(jnp.clip(x, 0.0, 1.0)) ** 2
