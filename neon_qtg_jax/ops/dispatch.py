"""Chooses the implementation of attention and of the TopoFilter persistence for a config.

Each attention kind (model/attention/) dispatches its own fast paths by the resolved `impl`;
this module resolves `impl` and says which platform a trace targets.

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

from neon_qtg_jax.ops import blockwise_topo
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


def topo_persistence(psi: jax.Array, *, k: int, eps: float, impl: str = "reference",
                     block_q: int = 128, block_k: int = 128) -> jax.Array:
  """Causal persistence s_t (B, L) of psi (B, L, 2d)."""
  if impl == "reference":
    return topo.topo_persistence_reference(psi, k=k, eps=eps)
  if impl in ("blockwise", "pallas"):
    return blockwise_topo.topo_persistence_blockwise(psi, k=k, eps=eps, block_q=block_q, block_k=block_k)
  raise ValueError(f"model.attention_impl={impl!r} is not available for the TopoFilter")
