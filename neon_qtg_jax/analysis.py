"""What a trained model does inside: per-layer attention weights, TopoFilter persistence and weights,
learned gamma and embedding norms, for `tools/analyze.py`.

Everything comes from the model's own forward pass: `QTGModel.recorded` runs it with record=True,
and the attention (whatever its kind) sows the probabilities it computed, the blocks sow s_t and w_t,
and the attention kind adds its own statistics (AttentionKind.diagnostics). Nothing here
re-derives a score.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neon_qtg_jax.model.qtg import QTGModel


def layer_traces(model: QTGModel, tokens: jax.Array) -> dict[str, np.ndarray]:
  """Per layer, for int32 tokens (B, L): "attention" (layers, B, H, L, L), "s" and "w" (layers, B, L)
  (zeros and ones without the TopoFilter), "gamma" (layers, H) or absent for kinds without one."""
  recorded = model.recorded(jnp.asarray(tokens))
  traces = {name: recorded[name] for name in ("attention", "s", "w")}
  gamma = model.learned_scales().get("gamma")
  if gamma is not None:
    traces["gamma"] = gamma
  return {k: np.asarray(jax.device_get(v)) for k, v in traces.items()}


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


def sphere_statistics(model: QTGModel, tokens: jax.Array) -> list[dict[str, Any]]:
  """Per layer, what the attention sees on int32 tokens (B, L) (docs/MODEL.md, "Selectivity"): the
  attention entropy relative to uniform over the prefix, and for kinds with learned scales the kind's
  diagnostics and the scales. For geo: the entropy of softmax(q~) and softmax(k~) over head_dim
  relative to log(head_dim) (1: the sphere point is the uniform distribution); the 5/50/95% quantiles
  over causal pairs j <= i of the Bhattacharyya coefficient BC = q~_i . k~_j and of gamma_h D^2; the
  mean over queries i >= 1 of the score range max_j - min_j (what the softmax can tell apart).
  Dot-product layers report only the attention entropy.
  """
  recorded = {k: np.asarray(jax.device_get(v)) for k, v in model.recorded(jnp.asarray(tokens)).items()}
  scales = {name: np.asarray(jax.device_get(v)) for name, v in model.learned_scales().items()}
  extra = sorted(set(recorded) - {"attention", "s", "w"})
  out = []
  for i in range(model.cfg.num_layers):
    entropy = float(normalized_entropy(recorded["attention"][i][None]).mean())
    stats: dict[str, Any] = {"layer": i, "attention_entropy": entropy}
    for name in extra:
      value = recorded[name][i]
      stats[name] = value.tolist() if value.ndim else float(value)
    if scales:
      stats["scales"] = {name: v[i].round(4).tolist() for name, v in scales.items()}
    out.append(stats)
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
