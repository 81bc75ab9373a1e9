"""The named model variants the project compares, as config overrides (dotted field -> value).

  qtg        QTG with the project's defaults (config.py)
  qtg_seed   QTG in the spec's form: W_psi initialised normal(init_std) like every matrix, the sphere map
             sqrt(softmax(.)) applied to q and k as projected
  gpt_spec   the spec's baseline switches: a pre-norm GPT inside QTG's shape (Q, K, V d wide, half the
             2d residual; FFN hidden 4d = 2x the residual; untied embeddings)
  gpt        a standard-shape GPT (nanoGPT / GPT-2): attention as wide as the residual, FFN hidden 4x the
             residual, token embedding tied to the output head
  qtg_cosine QTG with the `cosine` attention kind: the default score's second-order expansion, so against
             qtg it isolates what the exact Fisher-Rao geometry adds
  qtg_dot    QTG with plain scaled dot-product scores in the same block (embedding, filter, W_psi, losses)
"""

from __future__ import annotations

from typing import Any

import ml_collections

from neon_qtg_jax.config import apply_overrides

NO_QTG_LOSSES = {"training.lambda_topo": 0.0, "training.lambda_geo": 0.0, "training.lambda_quantum": 0.0}
GPT_SPEC = {"model.attention": "dot", "model.topofilter": False, "model.w_psi": False,
            "model.amplitude_embedding": False} | NO_QTG_LOSSES
GPT = GPT_SPEC | {"model.attention_width": "residual", "model.mlp_ratio": 8, "model.tie_embeddings": True}
QTG_SEED = {"model.sphere_map": "seed", "model.w_psi_init": "normal"}

VARIANTS: dict[str, dict[str, Any]] = {"qtg": {}, "qtg_seed": QTG_SEED, "gpt_spec": GPT_SPEC, "gpt": GPT,
                                       "qtg_cosine": {"model.attention": "cosine"},
                                       "qtg_dot": {"model.attention": "dot"}}


def variant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of config with the named variant's overrides."""
  if name not in VARIANTS:
    raise KeyError(f"unknown variant {name!r}: one of {sorted(VARIANTS)}")
  out = ml_collections.ConfigDict(config.to_dict())
  apply_overrides(out, VARIANTS[name], f"variant {name}")
  return out
