"""`dot`: scaled dot-product attention, score = q . k / sqrt(head_dim) (the GPT baseline).

No parameters of its own. Fast paths: the blockwise JAX loop and, on GPU with 16-bit operands,
cuDNN's fused attention. The decode cache stores the raw keys.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from neon_qtg_jax.model.attention.base import AttentionKind, register
from neon_qtg_jax.ops import blockwise_geo
from neon_qtg_jax.ops.dispatch import on_gpu


class Dot(AttentionKind):
  name = "dot"
  display_name = "dot-product"

  def scores(self, a: jax.Array, b: jax.Array, p: Any) -> jax.Array:
    scale = a.shape[-1] ** -0.5
    return jnp.einsum("bqhd,bkhd->bhqk", a, b, preferred_element_type=jnp.float32) * scale

  def attend(self, q, k, v, p, *, impl, block_q, block_k):
    if impl == "pallas" and on_gpu() and v.dtype in (jnp.bfloat16, jnp.float16):
      # cuDNN's fused attention takes 16-bit operands only; float32 runs blockwise
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl in ("blockwise", "pallas"):
      return blockwise_geo.dot_attention_blockwise(q, k, v, block_q=block_q, block_k=block_k)
    if impl == "reference":
      return self.reference(q, k, v, p)
    raise ValueError(f"model.attention_impl={impl!r} is not available for attention={self.name!r}")


DOT = register(Dot())
