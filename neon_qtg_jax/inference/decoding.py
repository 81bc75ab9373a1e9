"""The decode cache of QTGModel: its allocation, layout, sharding and bookkeeping. The computation is the
model's own forward pass (QTGModel.__call__ with a cache), so prefill and single-token decode run the
same code as training.

Per layer the cache holds, for every slot of a fixed-size buffer of T tokens, the keys
as the attention kind stores them (AttentionKind.key: the sphere points sqrt(softmax(k~)) for geo,
the raw keys for dot), the values V and the unit states phi of the TopoFilter. Prompts
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

from neon_qtg_jax.model import attention as attention_kinds
from neon_qtg_jax.model.cache import LayerCache, Slots, write
from neon_qtg_jax.model.qtg import QTGModel, compute_dtype
from neon_qtg_jax.model.qtg import head_dim as model_head_dim
from neon_qtg_jax.parallel import ShardingConfig


class DecodeCache(NamedTuple):
  """Per-layer caches with a leading layer axis, and which slots hold real tokens.

  keys, values: (num_layers, B, T, H, hd) in the model's compute dtype; keys as the attention
  kind stores them (AttentionKind.key, AttentionKind.key_width wide). phi: (num_layers, B, T, 2d)
  unit states in the compute dtype (float32 or
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
  key_shape = kv_shape[:-1] + (attention_kinds.get(cfg.attention).key_width(head_dim),)
  phi = jnp.zeros((cfg.num_layers, batch, size, 2 * cfg.embed_dim), dtype) if cfg.topofilter else None
  return DecodeCache(jnp.zeros(key_shape, dtype), jnp.zeros(kv_shape, dtype), phi,
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


def forward_cached(model: QTGModel, cache: DecodeCache, tokens: jax.Array, positions: jax.Array,
                   start: jax.Array | int, new_valid: jax.Array, *, last_only: bool = False
                   ) -> tuple[jax.Array, DecodeCache]:
  """Runs n new tokens through the model's one forward pass against the cache.

  tokens, positions: (B, n) int32; new_valid: (B, n) bool (False for left padding);
  start: the slot of the first new token, the same for every row or (B,) one per row. Returns float32 logits
  (B, n, V), or (B, 1, V) for the last new token with last_only, and the updated cache.
  """
  start = jnp.asarray(start, jnp.int32)
  query = jnp.broadcast_to(start[..., None] + jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  slots = Slots(start, query, write(cache.valid, new_valid, start))
  logits, layers = model(tokens, positions=positions, cache=LayerCache(cache.keys, cache.values, cache.phi),
                         slots=slots, last_only=last_only)
  return logits, DecodeCache(layers.keys, layers.values, layers.phi, slots.valid)


def left_pad(prompts: list[list[int]], length: int, pad_id: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Left-pads token lists to `length`: (tokens, positions, valid), each (B, length)."""
  tokens, positions, valid = [], [], []
  for prompt in prompts:
    pad = length - len(prompt)
    tokens.append([pad_id] * pad + list(prompt))
    positions.append([0] * pad + list(range(len(prompt))))
    valid.append([False] * pad + [True] * len(prompt))
  return (jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(valid, bool))
