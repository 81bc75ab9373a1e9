"""`geo`: Fisher-Rao (Bhattacharyya-angle) attention, the QTG score (docs/MODEL.md, "Attention").

  a = sqrt(softmax(q~)), b = sqrt(softmax(k~)) over head_dim (points of the unit sphere),
  score = -gamma_h arccos(a . b)^2, gamma_h a learned positive per-head scale,
where q~, k~ are what the sphere map receives, chosen by `model.sphere_map`:
  seed    q and k as projected (the spec's form)
  scaled  beta_h q and beta_h k, beta_h a learned positive per-head scale initialised at `model.beta`
  normed  beta_h q / rms(q) and beta_h k / rms(k) (QK-norm before the sphere map; the default);
          with `model.topo_apply="after_norm"` times the TopoFilter's w_t (filter_weight)
Fast paths: the blockwise JAX loop (ops/blockwise_geo.py) and, on GPU, the Pallas kernel (ops/pallas_geo.py).
The decode cache stores b, the keys' sphere points.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from neon_qtg_jax import ops
from neon_qtg_jax.model.attention.base import AttentionKind, register
from neon_qtg_jax.model.common import positive_scale, positive_scale_raw, rms_normalize
from neon_qtg_jax.ops import blockwise_geo, pallas_geo
from neon_qtg_jax.ops.dispatch import on_gpu


def pair_quantiles(x: jax.Array, mask: jax.Array, qs: tuple[float, ...] = (0.05, 0.5, 0.95)) -> jax.Array:
  """Quantiles of x (B, H, Lq, Lk) over the pairs the (Lq, Lk) mask keeps."""
  return jnp.nanquantile(jnp.where(mask, x, jnp.nan), jnp.asarray(qs))


def score_range(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over queries i >= 1 of max_j - min_j of the scores over visible keys: what the softmax can tell apart."""
  high = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1)
  low = jnp.min(jnp.where(mask, scores, jnp.inf), axis=-1)
  return jnp.mean((high - low)[..., 1:])


def softmax_entropy_ratio(x: jax.Array) -> jax.Array:
  """Mean entropy of softmax(x) over the last axis (head_dim), relative to log(head_dim)."""
  logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.mean(entropy) / jnp.log(float(x.shape[-1]))


class Geo(AttentionKind):
  """Fisher-Rao attention with a learned per-head gamma and the `model.sphere_map` inputs."""

  name = "geo"
  display_name = "Fisher-Rao"

  def init_params(self, attn: nnx.Module, cfg: ml_collections.ConfigDict) -> None:
    attn.sphere_map = cfg.sphere_map
    attn.learn_gamma = cfg.learn_gamma
    attn.scale_param, attn.scale_lr_mult = cfg.scale_param, cfg.scale_lr_mult
    attn.gamma_raw = positive_scale_raw(cfg.gamma, cfg.num_heads, cfg.scale_param, cfg.scale_lr_mult)
    if cfg.sphere_map != "seed":
      attn.beta_raw = positive_scale_raw(cfg.beta, cfg.num_heads, cfg.scale_param, cfg.scale_lr_mult)

  def scales_per_head(self, cfg: ml_collections.ConfigDict) -> int:
    return 1 + (cfg.sphere_map != "seed")

  def gamma(self, attn: nnx.Module) -> jax.Array:
    raw = attn.gamma_raw[...]
    raw = raw if attn.learn_gamma else jax.lax.stop_gradient(raw)
    return positive_scale(raw, attn.scale_param, attn.scale_lr_mult)

  def beta(self, attn: nnx.Module) -> jax.Array:
    return positive_scale(attn.beta_raw[...], attn.scale_param, attn.scale_lr_mult)

  def learned_scales(self, attn: nnx.Module) -> dict[str, jax.Array]:
    scales = {"gamma": self.gamma(attn)}
    if attn.sphere_map != "seed":
      scales["beta"] = self.beta(attn)
    return scales

  def score_params(self, attn: nnx.Module) -> jax.Array:
    return self.gamma(attn)

  def _sphere_input(self, attn: nnx.Module, x: jax.Array) -> jax.Array:
    if attn.sphere_map == "seed":
      return x
    beta = self.beta(attn)[:, None]
    if attn.sphere_map == "normed":
      return (beta * rms_normalize(x, attn.eps)).astype(x.dtype)
    return (beta * x.astype(jnp.float32)).astype(x.dtype)

  def inputs(self, attn: nnx.Module, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self._sphere_input(attn, q), self._sphere_input(attn, k)

  def filter_weight(self, attn: nnx.Module, q: jax.Array, k: jax.Array, w: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """The normed map: w_t beta_h q / rms(q) (rms(q) divided w_t out of q = W_Q (w_t psi_t)); the seed
    and scaled maps are linear in q, so w_t is already there and nothing changes."""
    if attn.sphere_map != "normed":
      return q, k
    scale = w.astype(jnp.float32)[:, :, None, None]
    return (scale * q.astype(jnp.float32)).astype(q.dtype), (scale * k.astype(jnp.float32)).astype(k.dtype)

  def query(self, q: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return ops.sqrt_probs(q).astype(dtype)

  def key(self, k: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return ops.sqrt_probs(k).astype(dtype)

  def scores(self, a: jax.Array, b: jax.Array, p: Any) -> jax.Array:
    return ops.geo_scores(a, b, p)

  def attend(self, q, k, v, p, *, impl, block_q, block_k):
    if impl == "pallas" and on_gpu():
      return pallas_geo.geo_attention_pallas(q, k, v, p, block_q=block_q, block_k=block_k)
    if impl in ("blockwise", "pallas"):
      return blockwise_geo.geo_attention_blockwise(q, k, v, p, block_q=block_q, block_k=block_k)
    if impl == "reference":
      return self.reference(q, k, v, p)
    raise ValueError(f"model.attention_impl={impl!r} is not available for attention={self.name!r}")

  def diagnostics(self, q: jax.Array, k: jax.Array, p: Any, mask: jax.Array) -> dict[str, jax.Array]:
    """The entropy of softmax(q~), softmax(k~) over head_dim relative to log(head_dim) (1: the uniform
    point), quantiles of BC and of gamma D^2 over causal pairs, and the score range (docs/MODEL.md,
    "Selectivity")."""
    bc = jnp.einsum("bqhd,bkhd->bhqk", ops.sqrt_probs(q), ops.sqrt_probs(k))
    scaled_d2 = p[None, :, None, None] * ops.arccos_sq(bc)
    return {"q_softmax_entropy": softmax_entropy_ratio(q), "k_softmax_entropy": softmax_entropy_ratio(k),
            "bc_quantiles": pair_quantiles(bc, mask), "gamma_d2_quantiles": pair_quantiles(scaled_d2, mask),
            "score_range": score_range(-scaled_d2, mask)}


GEO = register(Geo())
