"""What one forward pass needs to run against a decode cache: the slots of the new tokens, and the
write of new entries into a layer's buffers.

The cache itself (its allocation, layout, sharding, left padding and per-row starts) belongs to
inference/decoding.py; the model's parts (TopoFilter, attention) each read and write their own
buffers of a `LayerCache` through `write`, at the slots a `Slots` names.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Slots(NamedTuple):
  """Where n new tokens go in a cache of T slots, and what each may see.

  start: () or (B,) the slot of the first new token (the same for every row, or one per row);
  query: (B, n) int32 the slot of each new token; valid: (B, T) bool, slots that hold a real
  token after this call's write (earlier tokens and the new non-pad ones).
  """
  start: jax.Array
  query: jax.Array
  valid: jax.Array

  def visible(self) -> jax.Array:
    """(B, n, T) bool: the valid slots up to each new token's own (what attention reads)."""
    slots = jnp.arange(self.valid.shape[1])[None, None, :]
    return self.valid[:, None, :] & (slots <= self.query[:, :, None])

  def strictly_before(self) -> jax.Array:
    """(B, n, T) bool: the valid slots before each new token (what its persistence s_t reads)."""
    slots = jnp.arange(self.valid.shape[1])[None, None, :]
    return self.visible() & (slots < self.query[:, :, None])


class LayerCache(NamedTuple):
  """One layer's buffers (or all layers', with a leading layer axis): per slot, the keys as the
  attention kind stores them (AttentionKind.key), the values (B, T, H, hd), and the TopoFilter's unit
  states phi (B, T, 2d), or None without the filter."""
  keys: jax.Array
  values: jax.Array
  phi: jax.Array | None


def write(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """Writes new (B, n, ...) into buffer (B, T, ...) at slot `start`, () or one per row (B,)."""
  if start.ndim == 1:
    return jax.vmap(write)(buffer[:, None], new[:, None], start)[:, 0]
  index = (0, start) + (0,) * (buffer.ndim - 2)
  return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), index)
