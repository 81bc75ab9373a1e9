"""What a trained model does inside: per-layer attention weights, TopoFilter persistence and weights,
learned gamma and embedding norms, for `tools/analyze.py`.

`layer_traces` runs the blocks one by one with the model's own pieces (Block.filtered_states,
GeoAttention.project and gamma) and keeps the attention probabilities that the fused attention
ops never materialise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neon_qtg_jax import ops
from neon_qtg_jax.model.qtg import QTGModel
from neon_qtg_jax.ops.geo_attention import MASK_VALUE


def attention_probs(layer: Any, f: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Causal attention probabilities (B, H, L, L) float32 of one block on filtered states f (B, L, 2d), and v."""
  q, k, v = layer.attn.project(f)
  if layer.attn.kind == "geo":
    scores = ops.geo_scores(ops.sqrt_probs(q), ops.sqrt_probs(k), layer.attn.gamma())
  else:
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  mask = ops.causal_mask(q.shape[1], k.shape[1])
  return jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1), v


def check_reproduces_attention(layer: Any, f: jax.Array, probs: jax.Array, v: jax.Array, index: int) -> None:
  """Raises ValueError unless probs @ v is the layer's own attention output: attention_probs re-derives the
  scores, so a model whose attention settings it does not know gets an error, not another attention's maps."""
  mine = np.asarray(jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).reshape(f.shape[0], f.shape[1], -1))
  theirs = np.asarray(layer.attn(f), np.float32)
  tolerance = (1e-2 if jnp.dtype(theirs.dtype) != jnp.float32 or v.dtype != jnp.float32 else 1e-4) * (
      np.abs(theirs).max() + 1e-6)
  difference = float(np.abs(mine - theirs).max())
  if difference > tolerance:
    raise ValueError(f"layer {index}: analysis.attention_probs does not reproduce the model's attention output "
                     f"(max difference {difference:.3g}, tolerance {tolerance:.3g}); it needs the scores of this "
                     "model's attention settings")


def layer_traces(model: QTGModel, tokens: jax.Array) -> dict[str, np.ndarray]:
  """Per layer, for int32 tokens (B, L): "attention" (layers, B, H, L, L), "s" and "w" (layers, B, L)
  (zeros and ones without the TopoFilter), "gamma" (layers, H) or absent for dot-product attention.
  Raises ValueError when the traced attention is not the model's own (check_reproduces_attention)."""
  graphdef, state = nnx.split(model.blocks)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  h = model.embed(tokens, positions)
  traces: dict[str, list] = {"attention": [], "s": [], "w": [], "gamma": []}
  for i in range(model.cfg.num_layers):
    layer = nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
    f, s = layer.filtered_states(h)
    probs, v = attention_probs(layer, f)
    check_reproduces_attention(layer, f, probs, v, i)
    traces["attention"].append(probs)
    traces["s"].append(s)
    traces["w"].append(layer.topo.weights(s) if layer.use_topofilter else jnp.ones_like(s))
    gamma = layer.attn.gamma()
    if gamma is not None:
      traces["gamma"].append(gamma)
    h, _ = layer(h)
  return {k: np.asarray(jax.device_get(jnp.stack(v))) for k, v in traces.items() if v}


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
  """Mean over windows and query positions t >= 1 of H(row) / log(t + 1): 1 is uniform attention over the
  prefix, 0 attends to one token. probs (layers, B, H, L, L) -> (layers, H)."""
  logp = np.log(np.where(probs > 0, probs, 1.0))
  entropy = -np.sum(probs * logp, axis=-1)  # (layers, B, H, L)
  length = probs.shape[-1]
  uniform = np.log(np.arange(1, length + 1, dtype=np.float64))
  return np.mean(entropy[..., 1:] / uniform[1:], axis=(1, 3))


def embedding_norms(model: QTGModel, tokens: np.ndarray) -> dict[str, np.ndarray]:
  """Norms of the embedding table rows (V,), of the position rows (max_seq_len,), and of the summed
  embedding E[tok] + P[t] before the amplitude normalisation, for the given tokens (B, L)."""
  table = np.asarray(model.embed.tokens.embedding[...])
  positions = np.asarray(model.embed.positions[...])
  summed = table[tokens] + positions[None, : tokens.shape[1]]
  return {"token": np.linalg.norm(table, axis=-1), "position": np.linalg.norm(positions, axis=-1),
          "summed": np.linalg.norm(summed, axis=-1)}


def _quantiles(x: jax.Array, mask: jax.Array, qs: tuple[float, ...] = (0.05, 0.5, 0.95)) -> list[float]:
  values = np.asarray(jax.device_get(x))[np.broadcast_to(np.asarray(mask), x.shape)]
  return [float(v) for v in np.quantile(values, qs)]


def _softmax_entropy_ratio(x: jax.Array) -> float:
  """Mean entropy of softmax(x) over the last axis (head_dim), relative to log(head_dim)."""
  logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return float(jnp.mean(entropy) / np.log(x.shape[-1]))


def sphere_statistics(model: QTGModel, tokens: jax.Array) -> list[dict[str, Any]]:
  """Per layer, what the Fisher-Rao attention sees on int32 tokens (B, L) (docs/MODEL.md, "Selectivity").

  For each layer: the entropy of softmax(q) and softmax(k) over head_dim relative to log(head_dim)
  (1: the sphere point is the uniform distribution); the 5/50/95% quantiles over causal pairs j <= i
  of the Bhattacharyya coefficient BC = q~_i . k~_j and of gamma_h D^2 = gamma_h arccos(BC)^2 (the
  negated score); the mean over queries i >= 1 of the score range max_j - min_j (what the softmax
  can tell apart); the attention entropy relative to uniform over the prefix; the learned scales.
  Dot-product layers report only the attention entropy.
  """
  graphdef, state = nnx.split(model.blocks)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  h = model.embed(tokens, positions)
  mask = ops.causal_mask(tokens.shape[1], tokens.shape[1])[None, None]
  out = []
  for i in range(model.cfg.num_layers):
    layer = nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
    f, _ = layer.filtered_states(h)
    probs, _ = attention_probs(layer, f)
    stats: dict[str, Any] = {"layer": i, "attention_entropy": float(normalized_entropy(
        np.asarray(jax.device_get(probs))[None]).mean())}
    if layer.attn.kind == "geo":
      q, k, _ = layer.attn.project(f)
      bc = jnp.einsum("bqhd,bkhd->bhqk", ops.sqrt_probs(q), ops.sqrt_probs(k))
      gamma = layer.attn.gamma()
      scaled_d2 = gamma[None, :, None, None] * ops.arccos_sq(bc)
      high = jnp.max(jnp.where(mask, scaled_d2, -jnp.inf), axis=-1)
      low = jnp.min(jnp.where(mask, scaled_d2, jnp.inf), axis=-1)
      stats.update({
          "q_softmax_entropy": _softmax_entropy_ratio(q), "k_softmax_entropy": _softmax_entropy_ratio(k),
          "bc_quantiles": _quantiles(bc, mask), "gamma_d2_quantiles": _quantiles(scaled_d2, mask),
          "score_range": float(jnp.mean((high - low)[..., 1:])),
          "scales": {name: np.asarray(jax.device_get(v)).round(4).tolist()
                     for name, v in layer.attn.learned_scales().items()},
      })
    out.append(stats)
    h, _ = layer(h)
  return out


def attention_gradient_norms(model: QTGModel, batch: dict[str, jax.Array],
                             weights: Any) -> list[dict[str, float]]:
  """Per layer, the norms of the training loss's gradient (loss.qtg_loss with `weights`) reaching
  W_Q, W_K, W_V, gamma and beta, each beside the norm of the parameter itself."""
  from neon_qtg_jax.loss import qtg_loss  # pylint: disable=import-outside-toplevel

  def loss(m: QTGModel) -> jax.Array:
    logits, aux = m(batch["inputs"], return_aux=True)
    return qtg_loss(logits, batch["targets"], aux, weights, batch.get("mask"))["loss"]

  grads = nnx.grad(loss)(model)
  kernel, grad_kernel = model.blocks.attn.w_qkv.kernel[...], grads.blocks.attn.w_qkv.kernel[...]
  out = []
  for i in range(model.cfg.num_layers):
    row: dict[str, float] = {"layer": i}
    for j, name in enumerate(("w_q", "w_k", "w_v")):
      row[f"grad_{name}"] = float(jnp.linalg.norm(grad_kernel[i, :, j]))
      row[name] = float(jnp.linalg.norm(kernel[i, :, j]))
    for name in ("gamma_raw", "beta_raw"):
      if hasattr(model.blocks.attn, name):
        row[f"grad_{name}"] = float(jnp.linalg.norm(getattr(grads.blocks.attn, name)[...][i]))
    out.append(row)
  return out
