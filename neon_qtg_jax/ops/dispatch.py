"""Chooses the implementation of attention and of the TopoFilter persistence for a config.

`impl` is the config's `model.attention_impl`:
  reference  the plain versions in geo_attention.py / topo_filter.py ((B, H, L, L) arrays)
  blockwise  the flash-style JAX versions (blockwise_geo.py, blockwise_topo.py), any backend
  pallas     on GPU: the Pallas kernel for Fisher-Rao attention (pallas_geo.py) and cuDNN's
             fused attention for 16-bit dot-product attention; elsewhere, for float32
             dot-product attention and for the TopoFilter (which has no kernel of its own),
             the blockwise versions
  auto       blockwise from `blockwise_min_len` tokens on, reference below
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp

from neon_qtg_jax.ops import blockwise_geo
from neon_qtg_jax.ops import blockwise_topo
from neon_qtg_jax.ops import pallas_geo
from neon_qtg_jax.ops import geo_attention as geo
from neon_qtg_jax.ops import topo_filter as topo


def resolve_impl(impl: str, length: int, blockwise_min_len: int) -> str:
  if impl == "auto":
    return "blockwise" if length >= blockwise_min_len else "reference"
  return impl


_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
  """Traces inside pick implementations for `platform` ("gpu", "cpu"): the compile target, not this host."""
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def on_gpu() -> bool:
  """Whether the program being traced will run on a GPU: the compile target's platform, else the default backend."""
  return (_TARGET_PLATFORM.get() or jax.default_backend()) == "gpu"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, gamma: jax.Array | None, *, kind: str,
              impl: str = "reference", block_q: int = 128, block_k: int = 128) -> jax.Array:
  """Causal attention over (B, L, H, hd) inputs; kind "geo" (Fisher-Rao) or "dot"."""
  if kind not in ("geo", "dot"):
    raise ValueError(f"model.attention={kind!r}: must be 'geo' or 'dot'")
  if impl == "pallas" and on_gpu():
    if kind == "geo":
      return pallas_geo.geo_attention_pallas(q, k, v, gamma, block_q=block_q, block_k=block_k)
    if v.dtype in (jnp.bfloat16, jnp.float16):  # cuDNN's fused attention takes 16-bit operands only
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  if impl in ("blockwise", "pallas"):
    if kind == "geo":
      return blockwise_geo.geo_attention_blockwise(q, k, v, gamma, block_q=block_q, block_k=block_k)
    return blockwise_geo.dot_attention_blockwise(q, k, v, block_q=block_q, block_k=block_k)
  if impl == "reference":
    if kind == "geo":
      return geo.geo_attention_reference(q, k, v, gamma)
    return geo.dot_attention_reference(q, k, v)
  raise ValueError(f"model.attention_impl={impl!r} is not available for attention={kind!r}")


def topo_persistence(psi: jax.Array, *, k: int, eps: float, impl: str = "reference",
                     block_q: int = 128, block_k: int = 128) -> jax.Array:
  """Causal persistence s_t (B, L) of psi (B, L, 2d)."""
  if impl == "reference":
    return topo.topo_persistence_reference(psi, k=k, eps=eps)
  if impl in ("blockwise", "pallas"):
    return blockwise_topo.topo_persistence_blockwise(psi, k=k, eps=eps, block_q=block_q, block_k=block_k)
  raise ValueError(f"model.attention_impl={impl!r} is not available for the TopoFilter")
