"""Token sampling (greedy, temperature, top-k, top-p) and batched cached generation.

`generate` is what the trainer and the tools call: one compiled prefill of the left-padded
prompts, then one compiled `lax.while_loop` that samples a token, feeds it through the cache
and stops when every row has produced EOS or `max_new_tokens` tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from neon_qtg_jax.inference.decoding import DecodeCache, forward_cached, init_cache, left_pad, shard_cache
from neon_qtg_jax.model.qtg import QTGModel
from neon_qtg_jax.parallel import ShardingConfig

PROMPT_BUCKET = 16  # prompt slots are rounded up to a multiple of this to reuse compilations
NOT_GENERATED = -1  # output slot after a row stopped


class SamplingParams(NamedTuple):
  """Static sampling settings: temperature 0 is greedy; top_k 0 and top_p 1 keep every token."""
  temperature: float = 0.8
  top_k: int = 50
  top_p: float = 0.9

  @classmethod
  def from_config(cls, sampling_cfg: Any) -> "SamplingParams":
    return cls(float(sampling_cfg.temperature), int(sampling_cfg.top_k), float(sampling_cfg.top_p))


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """(..., V) bool, True for exactly the k largest logits per row (all when k is 0 or >= V)."""
  vocab = logits.shape[-1]
  if k <= 0 or k >= vocab:
    return jnp.ones(logits.shape, bool)
  _, idx = jax.lax.top_k(logits, k)
  return jnp.any(jax.nn.one_hot(idx, vocab, dtype=bool), axis=-2)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """(..., V) bool: the smallest set of most likely tokens whose probability reaches p.

  A token is kept when the mass of the tokens ranked above it is below p, so the most
  likely token is always kept. Tokens with logit -inf are never kept.
  """
  if p >= 1.0:
    return jnp.isfinite(logits)
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = (mass_before < p) & jnp.isfinite(sorted_logits)
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Temperature, then top-k, then top-p on the renormalised top-k distribution; removed tokens get -inf."""
  logits = logits.astype(jnp.float32) / params.temperature
  logits = jnp.where(top_k_mask(logits, params.top_k), logits, -jnp.inf)
  return jnp.where(top_p_mask(logits, params.top_p), logits, -jnp.inf)


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams, valid_vocab: int | None = None
                  ) -> jax.Array:
  """logits (B, V) -> token ids (B,) int32, below valid_vocab when given."""
  if valid_vocab is not None and valid_vocab < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)
  if params.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, params), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef: nnx.GraphDef, state: nnx.State, cache: DecodeCache, tokens: jax.Array,
             positions: jax.Array, valid: jax.Array) -> tuple[jax.Array, DecodeCache]:
  logits, cache = forward_cached(nnx.merge(graphdef, state), cache, tokens, positions, 0, valid, last_only=True)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "max_new_tokens", "eos_id", "valid_vocab"))
def _decode_loop(graphdef: nnx.GraphDef, state: nnx.State, cache: DecodeCache, logits: jax.Array,
                 lengths: jax.Array, start: jax.Array, key: jax.Array, *, params: SamplingParams,
                 max_new_tokens: int, eos_id: int | None, valid_vocab: int | None) -> jax.Array:
  """Samples up to max_new_tokens per row; returns (B, max_new_tokens) int32, NOT_GENERATED after a stop."""
  model = nnx.merge(graphdef, state)
  batch = logits.shape[0]
  out = jnp.full((batch, max_new_tokens), NOT_GENERATED, jnp.int32)
  done = jnp.zeros((batch,), bool)

  def cond(carry):
    step, _, _, _, done = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, logits, cache, out, done = carry
    token = jnp.where(done, NOT_GENERATED, sample_tokens(logits, jax.random.fold_in(key, step), params,
                                                           valid_vocab))
    out = out.at[:, step].set(token)
    if eos_id is not None:
      done = done | (token == eos_id)
    fed = jnp.maximum(token, 0)[:, None]
    logits, cache = forward_cached(model, cache, fed, (lengths + step)[:, None], start + step,
                                   jnp.ones((batch, 1), bool))
    return step + 1, logits[:, 0], cache, out, done

  _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), logits, cache, out, done))
  return out


@dataclasses.dataclass(frozen=True)
class GenerationStats:
  """Wall-clock split of one generate call in seconds (compilation included on a shape's first call)."""
  prefill_seconds: float
  decode_seconds: float
  prompt_tokens: int
  new_tokens: int

  @property
  def decode_tokens_per_second(self) -> float:
    return self.new_tokens / max(self.decode_seconds, 1e-9)


def _check_prompts(model: QTGModel, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
  if not prompt_ids:
    raise ValueError("generate: no prompts given")
  if max_new_tokens <= 0:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be > 0")
  limit = model.cfg.max_seq_len
  vocab = model.cfg.vocab_size
  for i, prompt in enumerate(prompt_ids):
    if not prompt:
      raise ValueError(f"generate: prompt {i} is empty; start it with the tokenizer's BOS id")
    if len(prompt) + max_new_tokens > limit:
      raise ValueError(f"generate: prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                       f"it exceeds model.max_seq_len={limit} (shorten it or lower max_new_tokens)")
    bad = [t for t in prompt if not 0 <= int(t) < vocab]
    if bad:
      raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")


def generate_with_stats(model: QTGModel, prompt_ids: list[list[int]], *, sampling_cfg: Any,
                        max_new_tokens: int, eos_id: int | None, seed: int, valid_vocab: int | None = None,
                        sharding: ShardingConfig | None = None) -> tuple[list[list[int]], GenerationStats]:
  """`generate` plus timings. Blocks on the results, so the times are real."""
  _check_prompts(model, prompt_ids, max_new_tokens)
  params = SamplingParams.from_config(sampling_cfg)
  slots = -(-max(len(p) for p in prompt_ids) // PROMPT_BUCKET) * PROMPT_BUCKET
  tokens, positions, valid = left_pad(prompt_ids, slots)
  lengths = jnp.asarray([len(p) for p in prompt_ids], jnp.int32)
  graphdef, state = nnx.split(model)
  cache = init_cache(model, len(prompt_ids), slots + max_new_tokens)
  if sharding is not None:
    cache = shard_cache(cache, sharding)

  began = time.perf_counter()
  logits, cache = _prefill(graphdef, state, cache, tokens, positions, valid)
  logits.block_until_ready()
  prefilled = time.perf_counter()
  out = _decode_loop(graphdef, state, cache, logits, lengths, jnp.int32(slots), jax.random.key(seed),
                     params=params, max_new_tokens=max_new_tokens, eos_id=eos_id, valid_vocab=valid_vocab)
  out = jax.device_get(out)
  finished = time.perf_counter()

  results = []
  for row in out.tolist():
    kept = [t for t in row if t != NOT_GENERATED]
    if eos_id is not None and eos_id in kept:
      kept = kept[:kept.index(eos_id)]
    results.append(kept)
  stats = GenerationStats(prefilled - began, finished - prefilled, int(sum(lengths.tolist())),
                          int((out != NOT_GENERATED).sum()))
  return results, stats


def generate(model: QTGModel, prompt_ids: list[list[int]], *, sampling_cfg: Any, max_new_tokens: int,
             eos_id: int | None, seed: int, valid_vocab: int | None = None,
             sharding: ShardingConfig | None = None) -> list[list[int]]:
  """Continues each prompt; returns the new tokens only, cut before the first EOS.

  valid_vocab: pass the tokenizer's vocab_size when it is smaller than the model's, so no id
  the tokenizer cannot decode is ever sampled.

  sampling_cfg: config.sampling (temperature, top_k, top_p; temperature 0 is greedy).
  sharding: the run's mesh and rules (the model's parameters live there); the decode cache is
  placed by its logical axes (decoding.CACHE_AXES). None leaves the cache unplaced (one device).

  The same seed, prompts and model give the same tokens. Raises ValueError for an empty
  prompt, an out-of-vocabulary id, or a prompt that with max_new_tokens exceeds max_seq_len.
  """
  return generate_with_stats(model, prompt_ids, sampling_cfg=sampling_cfg, max_new_tokens=max_new_tokens,
                             eos_id=eos_id, seed=seed, valid_vocab=valid_vocab, sharding=sharding)[0]
