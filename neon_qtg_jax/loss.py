"""The four-term QTG loss: L = L_CE + lambda_topo L_topo + lambda_geo L_geo + lambda_quantum L_quantum."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from neon_qtg_jax.ops.arccos_sq import arccos_sq


class LossWeights(NamedTuple):
  topo: float = 0.1
  geo: float = 0.05
  quantum: float = 0.01

  @classmethod
  def from_config(cls, training_cfg) -> "LossWeights":
    return cls(training_cfg.lambda_topo, training_cfg.lambda_geo, training_cfg.lambda_quantum)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def target_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p_model(y_t): logits (B, L, V) float32, targets (B, L) int -> (B, L)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def cross_entropy(target_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """L_CE: mean of -log p(y_t) over non-padding targets."""
  return _masked_mean(-target_logp, mask)


def topo_loss(s: jax.Array, mask: jax.Array) -> jax.Array:
  """L_topo: mean over layers and tokens t >= 1 of (1 - s_t)^2; s (layers, B, L), mask (B, L)."""
  after_first = mask.at[:, 0].set(False)
  per_token = jnp.mean((1.0 - s) ** 2, axis=0)
  return _masked_mean(per_token, after_first)


def geo_loss(target_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """L_geo: mean of arccos(sqrt(p(y_t)))^2, the squared Fisher-Rao distance to the one-hot target."""
  return _masked_mean(arccos_sq(jnp.exp(0.5 * target_logp)), mask)


def quantum_loss(residual: jax.Array, mask: jax.Array) -> jax.Array:
  """L_quantum: mean over tokens of (1 - ||Psi_t||^2)^2 with Psi_t = h_t / sqrt(2d); residual (B, L, 2d)."""
  residual = residual.astype(jnp.float32)
  norm_sq = jnp.sum(residual * residual, axis=-1) / residual.shape[-1]
  return _masked_mean((1.0 - norm_sq) ** 2, mask)


def qtg_loss(logits: jax.Array, targets: jax.Array, aux: dict[str, jax.Array], weights: LossWeights,
             mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Every term separately plus "loss" (the weighted total) and "perplexity" = exp(L_CE).

  logits (B, L, V) float32; targets (B, L) int; aux from QTGModel(..., return_aux=True);
  mask (B, L) bool, True for scored targets (default all).
  """
  if mask is None:
    mask = jnp.ones(targets.shape, bool)
  logp = target_log_probs(logits, targets)
  terms = {
      "ce": cross_entropy(logp, mask),
      "topo": topo_loss(aux["s"], mask),
      "geo": geo_loss(logp, mask),
      "quantum": quantum_loss(aux["residual"], mask),
  }
  terms["loss"] = (terms["ce"] + weights.topo * terms["topo"] + weights.geo * terms["geo"]
                   + weights.quantum * terms["quantum"])
  terms["perplexity"] = jnp.exp(terms["ce"])
  return terms
