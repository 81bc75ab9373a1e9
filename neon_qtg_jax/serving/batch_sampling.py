"""Sampling with settings per row: the server's slots each decode for a request with its own temperature, top_p and seed.

inference/sampling.py takes one static SamplingParams for the whole batch (one compilation
per setting); here temperature and top_p are (S,) arrays, so one compiled decode step serves
every mix of requests. The filter is the same: temperature, then top-p (the smallest set of
most likely tokens whose probability reaches p); temperature 0 is greedy. OpenAI's API has no
top-k, so none is applied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_rows(logits: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """logits (S, V) / temperature (S,), tokens outside each row's top-p set -> -inf. Rows with temperature 0 are
  scaled by 1 (they are sampled greedily)."""
  scale = jnp.where(temperature > 0, temperature, 1.0)
  logits = logits.astype(jnp.float32) / scale[:, None]
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)) & jnp.isfinite(sorted_logits)
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(keep, logits, -jnp.inf)


def sample_rows(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array,
                valid_vocab: int | None = None) -> jax.Array:
  """logits (S, V), temperature and top_p (S,), keys (S, 2) uint32 raw PRNG keys -> token ids (S,) int32."""
  if valid_vocab is not None and valid_vocab < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)
  greedy = jnp.argmax(logits, axis=-1)
  filtered = filter_rows(logits, temperature, top_p)
  sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
