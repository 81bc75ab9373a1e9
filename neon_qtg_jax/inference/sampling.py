"""Token sampling (greedy, temperature, top-k, top-p) and batched cached generation.

One sampler: `filter_logits` takes one static setting for the whole batch (`sample_tokens`, what
`continue_prompts` uses) or a temperature and top_p per row (`sample_rows`, the server's slots).

`continue_prompts` (the token ids that continue each prompt; `--mode=generate` is the mode around it,
inference/generate_mode.py) is what the trainer and the tools call: one compiled prefill of the left-padded
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
  """Sampling settings: temperature 0 is greedy; top_k 0 and top_p 1 keep every token.

  Python numbers (static: one compilation per setting, as `continue_prompts` uses them), or temperature and
  top_p as (B,) arrays, one per row (the server's slots, `sample_rows`).
  """
  temperature: float | jax.Array = 0.8
  top_k: int = 50
  top_p: float | jax.Array = 0.9

  @classmethod
  def from_config(cls, sampling_cfg: Any) -> "SamplingParams":
    return cls(float(sampling_cfg.temperature), int(sampling_cfg.top_k), float(sampling_cfg.top_p))


def _per_row(x: float | jax.Array) -> bool:
  return jnp.ndim(x) > 0


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """(..., V) bool, True for exactly the k largest logits per row (all when k is 0 or >= V)."""
  vocab = logits.shape[-1]
  if k <= 0 or k >= vocab:
    return jnp.ones(logits.shape, bool)
  _, idx = jax.lax.top_k(logits, k)
  return jnp.any(jax.nn.one_hot(idx, vocab, dtype=bool), axis=-2)


def top_p_mask(logits: jax.Array, p: float | jax.Array) -> jax.Array:
  """(B, V) bool: the smallest set of most likely tokens whose probability reaches p (a number, or (B,)
  one per row; rows with p >= 1 keep every finite token).

  A token is kept when the mass of the tokens ranked above it is below p, so the most
  likely token is always kept. Tokens with logit -inf are never kept.
  """
  if not _per_row(p) and p >= 1.0:
    return jnp.isfinite(logits)
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  if _per_row(p):
    p = jnp.asarray(p)[:, None]
    keep_sorted = ((mass_before < p) | (p >= 1.0)) & jnp.isfinite(sorted_logits)
  else:
    keep_sorted = (mass_before < p) & jnp.isfinite(sorted_logits)
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Temperature, then top-k, then top-p on the renormalised top-k distribution; removed tokens get -inf.
  Per-row temperatures of 0 scale by 1 (those rows are sampled greedily)."""
  if _per_row(params.temperature):
    temperature = jnp.asarray(params.temperature)
    logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  else:
    logits = logits.astype(jnp.float32) / params.temperature
  logits = jnp.where(top_k_mask(logits, params.top_k), logits, -jnp.inf)
  return jnp.where(top_p_mask(logits, params.top_p), logits, -jnp.inf)


def _valid_only(logits: jax.Array, valid_vocab: int | None) -> jax.Array:
  if valid_vocab is not None and valid_vocab < logits.shape[-1]:
    return jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)
  return logits


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams, valid_vocab: int | None = None
                  ) -> jax.Array:
  """logits (B, V) with one static setting and one key -> token ids (B,) int32, below valid_vocab when given."""
  logits = _valid_only(logits, valid_vocab)
  if params.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, params), axis=-1).astype(jnp.int32)


def filter_rows(logits: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """filter_logits with a temperature and a top_p per row (S,) and no top-k (OpenAI's API has none)."""
  return filter_logits(logits, SamplingParams(temperature, 0, top_p))


def sample_rows(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array,
                valid_vocab: int | None = None) -> jax.Array:
  """The same sampler with settings per row, so one compiled decode step serves every mix of requests
  (the server's slots): logits (S, V), temperature and top_p (S,), keys (S, 2) uint32 raw PRNG keys
  -> token ids (S,) int32; rows with temperature 0 are greedy."""
  logits = _valid_only(logits, valid_vocab)
  greedy = jnp.argmax(logits, axis=-1)
  filtered = filter_rows(logits, temperature, top_p)
  sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


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
  """Wall-clock split of one continue_prompts call in seconds (compilation included on a shape's first call)."""
  prefill_seconds: float
  decode_seconds: float
  prompt_tokens: int
  new_tokens: int

  @property
  def decode_tokens_per_second(self) -> float:
    return self.new_tokens / max(self.decode_seconds, 1e-9)


def _check_prompts(model: QTGModel, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
  if not prompt_ids:
    raise ValueError("continue_prompts: no prompts given")
  if max_new_tokens <= 0:
    raise ValueError(f"continue_prompts: max_new_tokens={max_new_tokens} must be > 0")
  limit = model.cfg.max_seq_len
  vocab = model.cfg.vocab_size
  for i, prompt in enumerate(prompt_ids):
    if not prompt:
      raise ValueError(f"continue_prompts: prompt {i} is empty; start it with the tokenizer's BOS id")
    if len(prompt) + max_new_tokens > limit:
      raise ValueError(f"continue_prompts: prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                       f"it exceeds model.max_seq_len={limit} (shorten it or lower max_new_tokens)")
    bad = [t for t in prompt if not 0 <= int(t) < vocab]
    if bad:
      raise ValueError(f"continue_prompts: prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")


def continue_prompts_with_stats(model: QTGModel, prompt_ids: list[list[int]], *, sampling_cfg: Any,
                                max_new_tokens: int, eos_id: int | None, seed: int, valid_vocab: int | None = None,
                                sharding: ShardingConfig) -> tuple[list[list[int]], GenerationStats]:
  """`continue_prompts` plus timings. Blocks on the results, so the times are real."""
  _check_prompts(model, prompt_ids, max_new_tokens)
  params = SamplingParams.from_config(sampling_cfg)
  slots = -(-max(len(p) for p in prompt_ids) // PROMPT_BUCKET) * PROMPT_BUCKET
  tokens, positions, valid = left_pad(prompt_ids, slots)
  lengths = jnp.asarray([len(p) for p in prompt_ids], jnp.int32)
  graphdef, state = nnx.split(model)
  cache = shard_cache(init_cache(model, len(prompt_ids), slots + max_new_tokens), sharding)

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


def continue_prompts(model: QTGModel, prompt_ids: list[list[int]], *, sampling_cfg: Any, max_new_tokens: int,
                     eos_id: int | None, seed: int, valid_vocab: int | None = None,
                     sharding: ShardingConfig) -> list[list[int]]:
  """Continues each prompt; returns the new tokens only, cut before the first EOS.

  valid_vocab: pass the tokenizer's vocab_size when it is smaller than the model's, so no id
  the tokenizer cannot decode is ever sampled.

  sampling_cfg: config.sampling (temperature, top_k, top_p; temperature 0 is greedy).
  sharding: the run's mesh and rules (ShardingConfig.from_config(config.parallel): the model's parameters
  live there); the decode cache is placed by its logical axes (decoding.CACHE_AXES).

  The same seed, prompts and model give the same tokens. Raises ValueError for an empty
  prompt, an out-of-vocabulary id, or a prompt that with max_new_tokens exceeds max_seq_len.
  """
  return continue_prompts_with_stats(model, prompt_ids, sampling_cfg=sampling_cfg, max_new_tokens=max_new_tokens,
                                     eos_id=eos_id, seed=seed, valid_vocab=valid_vocab, sharding=sharding)[0]


def encode_prompts(tokenizer, texts: list[str], max_prompt_tokens: int) -> tuple[list[list[int]], list[int]]:
  """EOS + tokens of each text, keeping the last max_prompt_tokens; returns (ids, tokens cut per prompt)."""
  ids, cut = [], []
  for text in texts:
    tokens = [tokenizer.eos_id] + tokenizer.encode(text)
    cut.append(max(0, len(tokens) - max_prompt_tokens))
    ids.append(tokens[-max_prompt_tokens:])
  return ids, cut


def text_completer(model: QTGModel, tokenizer: Any, sampling_cfg: Any, max_new_tokens: int, seed: int = 0, *,
                   sharding: ShardingConfig) -> Any:
  """complete(texts, call_index) -> continuations (text) of each prompt, for the benchmark tools.

  sharding: where the model's parameters live (Restored.sharding); the decode cache goes there too.

  Each call samples with seed + call_index, so repeated samples differ and reruns reproduce.
  Prompts longer than the model allows keep their last tokens.
  """
  max_new = min(max_new_tokens, model.cfg.max_seq_len - 1)

  def complete(texts: list[str], call_index: int = 0) -> list[str]:
    prompt_ids, _ = encode_prompts(tokenizer, texts, model.cfg.max_seq_len - max_new)
    outputs = continue_prompts(model, prompt_ids, sampling_cfg=sampling_cfg, max_new_tokens=max_new,
                               eos_id=tokenizer.eos_id, seed=seed + call_index, valid_vocab=tokenizer.vocab_size,
                               sharding=sharding)
    return [tokenizer.decode(ids) for ids in outputs]

  return complete
