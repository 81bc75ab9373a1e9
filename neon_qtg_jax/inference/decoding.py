"""Cached forward pass of QTGModel: prefill and single-token decode share one layer function.

Per layer the cache holds, for every slot of a fixed-size buffer of T tokens, the keys
as attention reads them (the transformed keys k~ = sqrt_probs(k) for Fisher-Rao attention,
raw keys for dot-product), the values V and the unit states phi of the TopoFilter. Prompts
of different lengths are left-padded: a pad slot is marked invalid and never enters the
s_t minima or the attention; positions are explicit, so a row's first real token has
position 0 whatever its padding.

A call writes n new tokens at slots [start, start + n) and lets each of them attend to
every valid slot up to its own (s_t: strictly before it), so prefill (n = prompt length)
and decoding (n = 1) are the same code and match the full forward pass of the model.
`start` is one slot for every row, or one per row (B,): the server's slots each hold a
sequence of their own length (serving/engine.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from neon_qtg_jax import ops
from neon_qtg_jax.model.qtg import Block, QTGModel, compute_dtype
from neon_qtg_jax.model.qtg import head_dim as model_head_dim
from neon_qtg_jax.ops.geo_attention import masked_softmax_values
from neon_qtg_jax.ops.topo_filter import k_smallest_mean
from neon_qtg_jax.parallel import ShardingConfig


class DecodeCache(NamedTuple):
  """Per-layer caches with a leading layer axis, and which slots hold real tokens.

  keys, values: (num_layers, B, T, H, hd) in the model's compute dtype; keys are k~ for
  geo attention. phi: (num_layers, B, T, 2d) unit states in the compute dtype (float32 or
  bf16: docs/PERFORMANCE.md measures bf16 as harmless), or None without the TopoFilter.
  valid: (B, T) bool, True for slots written with a real (non-pad) token.
  """
  keys: jax.Array
  values: jax.Array
  phi: jax.Array | None
  valid: jax.Array


def init_cache(model: QTGModel, batch: int, size: int) -> DecodeCache:
  """An empty cache of `size` slots for `batch` sequences."""
  cfg = model.cfg
  dtype = compute_dtype(cfg)
  heads = cfg.num_heads
  head_dim = model_head_dim(cfg)
  kv_shape = (cfg.num_layers, batch, size, heads, head_dim)
  phi = jnp.zeros((cfg.num_layers, batch, size, 2 * cfg.embed_dim), dtype) if cfg.topofilter else None
  return DecodeCache(jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype), phi,
                     jnp.zeros((batch, size), bool))


# Logical axes of the cache fields (parallel.rules maps them to mesh axes; config.LOGICAL_AXIS_RULES
# puts heads and the phi width on "fsdp"). An axis its mesh axes do not divide stays whole.
CACHE_AXES = {"keys": ("layers", None, None, "cache_heads", None), "values": ("layers", None, None, "cache_heads", None),
              "phi": ("layers", None, None, "cache_width"), "valid": (None, None)}


def cache_shardings(cache: DecodeCache, sharding: ShardingConfig) -> DecodeCache:
  """NamedShardings of a cache's fields (concrete or abstract; None for an absent phi).

  At the 100b shape (bf16) one sequence of 8192 tokens holds about 43 GB of cache, two thirds
  of it phi (float32, width 2d): splitting heads and the phi width keeps it per device small.
  """
  return DecodeCache(*(None if x is None else sharding.named(CACHE_AXES[name], x.shape)
                       for name, x in cache._asdict().items()))


def shard_cache(cache: DecodeCache, sharding: ShardingConfig) -> DecodeCache:
  """Places the cache's fields on the mesh by their logical axes (cache_shardings)."""
  return DecodeCache(*(None if x is None else jax.device_put(x, s)
                       for x, s in zip(cache, cache_shardings(cache, sharding))))


def _write(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """Writes new (B, n, ...) into buffer (B, T, ...) at slot `start`, () or one per row (B,)."""
  if start.ndim == 1:
    return jax.vmap(_write)(buffer[:, None], new[:, None], start)[:, 0]
  index = (0, start) + (0,) * (buffer.ndim - 2)
  return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), index)


def _cached_persistence(phi_new: jax.Array, phi_cache: jax.Array, before: jax.Array, k: int) -> jax.Array:
  """s_t of new unit states (B, n, 2d) against cached ones (B, T, 2d) under mask (B, n, T) -> (B, n)."""
  gram = jnp.einsum("bqc,bkc->bqk", phi_new, phi_cache)
  return k_smallest_mean(jnp.maximum(2.0 - 2.0 * gram, 0.0), before, k)


def _layer(block: Block, h: jax.Array, keys: jax.Array, values: jax.Array, phi: jax.Array | None,
           start: jax.Array, key_valid: jax.Array, query_slots: jax.Array):
  """One block over new tokens h (B, n, 2d) with this layer's caches; returns (h, keys, values, phi).

  query_slots: (B, n) the cache slot of each new token."""
  psi = block.psi(h)
  visible = key_valid[:, None, :] & (jnp.arange(key_valid.shape[1])[None, None, :] <= query_slots[:, :, None])
  if block.use_topofilter:
    phi_new = ops.unit_states(psi, block.topo.eps)
    phi = _write(phi, phi_new, start)
    strictly_before = visible & (jnp.arange(key_valid.shape[1])[None, None, :] < query_slots[:, :, None])
    s = _cached_persistence(phi_new, phi, strictly_before, block.topo.k)
    f = (block.topo.weights(s)[..., None] * psi).astype(psi.dtype)
  else:
    f = psi
  q, k, v = block.attn.project(f)
  values = _write(values, v, start)
  if block.attn.kind == "geo":
    keys = _write(keys, ops.sqrt_probs(k).astype(v.dtype), start)
    scores = ops.geo_scores(ops.sqrt_probs(q).astype(v.dtype), keys, block.attn.gamma())
    out = masked_softmax_values(scores, values, visible[:, None])
  else:
    keys = _write(keys, k, start)
    out = ops.dot_attention_reference(q, keys, values, mask=visible[:, None])
  h = h + block.w_o(out.reshape(h.shape[0], h.shape[1], -1)).astype(jnp.float32)
  return block.mlp_residual(h, None), keys, values, phi


def forward_cached(model: QTGModel, cache: DecodeCache, tokens: jax.Array, positions: jax.Array,
                   start: jax.Array | int, new_valid: jax.Array, *, last_only: bool = False
                   ) -> tuple[jax.Array, DecodeCache]:
  """Runs n new tokens through the model against the cache.

  tokens, positions: (B, n) int32; new_valid: (B, n) bool (False for left padding);
  start: the slot of the first new token, the same for every row or (B,) one per row. Returns float32 logits
  (B, n, V), or (B, 1, V) for the last new token with last_only, and the updated cache.
  """
  start = jnp.asarray(start, jnp.int32)
  key_valid = _write(cache.valid, new_valid, start)
  query_slots = jnp.broadcast_to(start[..., None] + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  h = model.embed(tokens, positions)
  graphdef, block_state = nnx.split(model.blocks)

  def body(h, layer):
    layer_state, keys, values, phi = layer
    h, keys, values, phi = _layer(nnx.merge(graphdef, layer_state), h, keys, values, phi, start, key_valid,
                                  query_slots)
    return h, (keys, values, phi)

  h, (keys, values, phi) = jax.lax.scan(body, h, (block_state, cache.keys, cache.values, cache.phi))
  if last_only:
    h = h[:, -1:]
  logits = model.logits(h)
  return logits, DecodeCache(keys, values, phi, key_valid)


def left_pad(prompts: list[list[int]], length: int, pad_id: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Left-pads token lists to `length`: (tokens, positions, valid), each (B, length)."""
  tokens, positions, valid = [], [], []
  for prompt in prompts:
    pad = length - len(prompt)
    tokens.append([pad_id] * pad + list(prompt))
    positions.append([0] * pad + list(range(len(prompt))))
    valid.append([False] * pad + [True] * len(prompt))
  return (jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(valid, bool))
