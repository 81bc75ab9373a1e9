"""Small pieces the model's modules and the attention kinds share: parameter axis metadata and the
learned positive per-head scales."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx


def axes(*names: str | None) -> dict[str, Any]:
  """nnx Variable metadata naming a parameter's logical axes (mapped to the mesh by parallel.rules).

  eager_sharding=False: the names only describe; the train step places the arrays on its mesh.
  """
  return {"out_sharding": names, "eager_sharding": False}


def inverse_softplus(y: float) -> float:
  return y + math.log(-math.expm1(-y))


POSITIVE_MAPS: dict[str, tuple[Callable[[jax.Array], jax.Array], Callable[[float], float]]] = {
    "softplus": (jax.nn.softplus, inverse_softplus),
    "exp": (jnp.exp, math.log),
}


def positive_scale(raw: jax.Array, param: str, lr_mult: float) -> jax.Array:
  """A learned positive scale stored as raw: map(lr_mult * raw), map softplus or exp (`model.scale_param`).

  lr_mult (`model.scale_lr_mult`) multiplies the step AdamW takes on the scale's pre-image, so it acts
  as a learning-rate multiplier; with exp the step is taken on log(scale).
  """
  return POSITIVE_MAPS[param][0](lr_mult * raw)


def positive_scale_raw(value: float, num_heads: int, param: str, lr_mult: float) -> nnx.Param:
  """The (H,) raw parameter whose positive_scale is `value` in every head."""
  raw = POSITIVE_MAPS[param][1](value) / lr_mult
  return nnx.Param(jnp.full((num_heads,), raw, jnp.float32), **axes("heads"))


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
