"""arccos(x)^2 with a finite, accurate value and derivative on all of [0, 1], without atan2 or sqrt.

arccos(x) = sqrt(1 - x) p(x) on [0, 1] with p the degree-7 polynomial of Abramowitz and Stegun
4.4.46 (absolute error <= 2e-8), so arccos(x)^2 = (1 - x) p(x)^2: a polynomial, cheap on every
backend (the Fisher-Rao score evaluates it for every query-key pair). 1 - x is exact near 1.

d/dx arccos(x)^2 = -2 arccos(x) / sqrt(1 - x^2) = -2 p(x) / sqrt(1 + x): no 0/0 at x = 1. Below
SERIES_BELOW from 1 the derivative uses theta / sin(theta) = 1 + t/3 + 2 t^2/15 + O(t^3) with
t = 1 - x, which is exactly 1 at x = 1 (slope -2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SERIES_BELOW = 1e-3
# Abramowitz and Stegun 4.4.46, lowest order first.
ARCCOS_COEFFICIENTS = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046,
                       0.0308918810, -0.0170881256, 0.0066700901, -0.0012624911)


def _arccos_over_sqrt(x: jax.Array) -> jax.Array:
  """p(x) = arccos(x) / sqrt(1 - x) on [0, 1] by Horner's rule."""
  out = jnp.full_like(x, ARCCOS_COEFFICIENTS[-1])
  for c in ARCCOS_COEFFICIENTS[-2::-1]:
    out = out * x + c
  return out


def stable_arccos(x: jax.Array) -> jax.Array:
  """arccos on [0, 1], accurate near 1: sqrt(1 - x) p(x)."""
  return jnp.sqrt(1.0 - x) * _arccos_over_sqrt(x)


def _theta_over_sin(x: jax.Array) -> jax.Array:
  t = 1.0 - x
  series = 1.0 + t / 3.0 + (2.0 / 15.0) * t * t
  return jnp.where(t < SERIES_BELOW, series, _arccos_over_sqrt(x) * jax.lax.rsqrt(1.0 + x))


@jax.custom_jvp
def arccos_sq(x: jax.Array) -> jax.Array:
  """arccos(clip(x, 0, 1))^2, elementwise. Derivative is -2 at x = 1 and 0 above 1."""
  clipped = jnp.clip(x, 0.0, 1.0)
  p = _arccos_over_sqrt(clipped)
  return (1.0 - clipped) * p * p


@arccos_sq.defjvp
def _arccos_sq_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  clipped = jnp.clip(x, 0.0, 1.0)
  slope = jnp.where(x > 1.0, 0.0, -2.0 * _theta_over_sin(clipped))
  return arccos_sq(x), slope * dx


def arccos_sq_reference(x):
  """Plain NumPy-style formula for tests: arccos(clip(x))^2."""
  return jnp.arccos(jnp.clip(x, 0.0, 1.0)) ** 2
