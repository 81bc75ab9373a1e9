"""Chooses the implementation of attention and of the TopoFilter persistence for a config.

`impl` is the config's `model.attention_impl`: "reference", "blockwise", "pallas", or "auto"
(blockwise from `blockwise_min_len` tokens on, reference below).
"""

from __future__ import annotations

import jax

from neon_qtg_jax.ops import geo_attention as geo
from neon_qtg_jax.ops import topo_filter as topo


def resolve_impl(impl: str, length: int, blockwise_min_len: int) -> str:
  if impl == "auto":
    return "blockwise" if length >= blockwise_min_len else "reference"
  return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, gamma: jax.Array | None, *, kind: str,
              impl: str = "reference", block_q: int = 128, block_k: int = 128) -> jax.Array:
  """Causal attention over (B, L, H, hd) inputs; kind "geo" (Fisher-Rao) or "dot"."""
  if impl == "reference":
    if kind == "geo":
      return geo.geo_attention_reference(q, k, v, gamma)
    return geo.dot_attention_reference(q, k, v)
  raise ValueError(f"model.attention_impl={impl!r} is not available for attention={kind!r}")


def topo_persistence(psi: jax.Array, *, k: int, eps: float, impl: str = "reference",
                     block_q: int = 128, block_k: int = 128) -> jax.Array:
  """Causal persistence s_t (B, L) of psi (B, L, 2d)."""
  if impl in ("reference", "pallas"):  # the TopoFilter has no Pallas kernel: reference below blockwise
    return topo.topo_persistence_reference(psi, k=k, eps=eps)
  raise ValueError(f"model.attention_impl={impl!r} is not available for the TopoFilter")
