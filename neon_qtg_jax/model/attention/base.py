"""The attention-kind interface and its registry: everything the project needs to know about one kind
of attention score, in one object.

A kind is registered once (`register`) under the name `model.attention` takes. The model's attention
module (model/qtg.py `Attention`) holds the projections and asks its kind for the rest; decoding,
analysis, `--mode=info` and config validation read the same object. Adding a kind is one file that
subclasses `AttentionKind` and calls `register` (docs/ARCHITECTURE.md, "Attention kinds").

Shapes: q, k, v are (B, L, H, hd) as projected; scores are (B, H, Lq, Lk) float32. A kind's
`score_params` (for example gamma (H,)) is whatever its `scores` and fast paths need from the module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from neon_qtg_jax.config import register_choices
from neon_qtg_jax.ops.geo_attention import causal_mask, masked_softmax_values


class AttentionKind:
  """One kind of causal softmax attention. Subclasses set `name` and `display_name` and override
  `scores`; every other method has a default that fits a kind without parameters or fast paths.

  The forward pass (training, evaluation, cached decoding and attention maps alike) is:
    q, k = inputs(attn, q, k)                      # what the score receives (a learned map, or none)
    q, k = filter_weight(attn, q, k, w)            # only under model.topo_apply="after_norm"
    a, b = query(q, dtype), key(k, dtype)          # mapped before scoring; b is what the cache stores
    out  = softmax_j(scores(a, b, p) | causal) v   # p = score_params(attn)
  `attend` runs the last two lines in one call and may dispatch to fast paths (blockwise, Pallas);
  they must agree with the reference to rounding.
  """

  name: str = ""
  display_name: str = ""

  # --- parameters -------------------------------------------------------------------------------
  def init_params(self, attn: nnx.Module, cfg: ml_collections.ConfigDict) -> None:
    """Creates the kind's own parameters as attributes of the attention module (none by default)."""

  def learned_scales(self, attn: nnx.Module) -> dict[str, jax.Array]:
    """The kind's learned per-head scales by name, each (H,) float32 (leading layer axes kept)."""
    return {}

  def scales_per_head(self, cfg: ml_collections.ConfigDict) -> int:
    """How many learned scalars per head `init_params` creates (the parameter count of --mode=info)."""
    return 0

  def score_params(self, attn: nnx.Module) -> Any:
    """What `scores` and the fast paths need from the module (a pytree; None by default)."""
    return None

  # --- the score --------------------------------------------------------------------------------
  def inputs(self, attn: nnx.Module, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Projected q, k (B, L, H, hd) -> what the score receives, in q's dtype (identity by default)."""
    return q, k

  def filter_weight(self, attn: nnx.Module, q: jax.Array, k: jax.Array, w: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """`model.topo_apply="after_norm"`: q, k as `inputs` returned and the TopoFilter's weights w (B, L)
    -> q, k with w applied where `inputs` divided its scale away (q and k are projections of f = w psi).
    Identity by default: without a normalisation in `inputs`, w already reaches the score through f."""
    return q, k

  def query(self, q: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Queries mapped before scoring (identity by default)."""
    return q

  def key(self, k: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Keys mapped before scoring: what the decode cache stores per key (identity by default).
    Its last axis must be key_width(head_dim) wide."""
    return k

  def key_width(self, head_dim: int) -> int:
    """Width of one cached key per head."""
    return head_dim

  def scores(self, a: jax.Array, b: jax.Array, p: Any) -> jax.Array:
    """The plain reference: mapped queries (B, Lq, H, .) against mapped keys (B, Lk, H, .) -> (B, H, Lq, Lk)
    float32 scores, before the mask and the softmax."""
    raise NotImplementedError(f"attention kind {self.name!r} defines no scores")

  def reference(self, q: jax.Array, k: jax.Array, v: jax.Array, p: Any,
                mask: jax.Array | None = None) -> jax.Array:
    """softmax_j(scores) v with the causal mask (or `mask`, broadcastable to (B, H, Lq, Lk))."""
    dtype = v.dtype
    scores = self.scores(self.query(q, dtype), self.key(k, dtype), p)
    if mask is None:
      mask = causal_mask(q.shape[1], k.shape[1])
    return masked_softmax_values(scores, v, mask)

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, p: Any, *, impl: str, block_q: int,
             block_k: int) -> jax.Array:
    """Causal attention (B, L, H, hd) -> (B, L, H, hd) in v's dtype by `impl` (reference, blockwise,
    pallas: resolved from model.attention_impl). A kind without fast paths runs the reference for
    every impl; one with them overrides this."""
    return self.reference(q, k, v, p)

  # --- cost -------------------------------------------------------------------------------------
  def flops_per_query(self, attention_dim: int, keys: float) -> float:
    """Model FLOPs of one query against `keys` keys in one layer, all heads: the score matmul and the
    value sum (2 x 2 x attention_dim per key); elementwise transforms are not counted."""
    return 2.0 * (2.0 * attention_dim * keys)

  # --- analysis ---------------------------------------------------------------------------------
  def diagnostics(self, q: jax.Array, k: jax.Array, p: Any, mask: jax.Array) -> dict[str, jax.Array]:
    """Kind-specific statistics of one layer's score inputs q, k (after `inputs`) under the (Lq, Lk) mask,
    as arrays (scalars or quantiles), for analysis.sphere_statistics. None by default."""
    return {}


_KINDS: dict[str, AttentionKind] = {}


def register(kind: AttentionKind) -> AttentionKind:
  """Adds a kind under its name (replacing one of the same name); returns it."""
  if not kind.name:
    raise ValueError(f"{type(kind).__name__}: an attention kind needs a name")
  _KINDS[kind.name] = kind
  return kind


def unregister(name: str) -> None:
  """Removes a kind (for tests that register a toy kind)."""
  _KINDS.pop(name, None)


def get(name: str) -> AttentionKind:
  """The kind registered under `name`; a ValueError naming model.attention and the known kinds otherwise."""
  if name not in _KINDS:
    raise ValueError(f"model.attention={name!r}: must be one of {names()}")
  return _KINDS[name]


def names() -> tuple[str, ...]:
  return tuple(_KINDS)


register_choices("model.attention", names)  # config.validate reads the registered names
