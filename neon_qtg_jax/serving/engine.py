"""Continuous batching: a fixed number of cache slots decoded together by one compiled step.

One engine thread owns the model and a DecodeCache of `slots` rows, each the model's full
context (model.max_seq_len). Between two decode steps it admits at most one waiting sequence:
that sequence's prompt is prefilled into a fresh one-row cache (one compilation per prompt
length bucket, powers of two from 16), written into a free row of the big cache, and its first
token sampled, all in one jitted call; then every slot advances by one token in one jitted
decode step whose shapes never change (free rows compute too, writing nothing valid). So a
new request stalls the running ones for at most one prefill, and a finished or cancelled one
frees its row for the next step.

In a slot, cache index = token position: the prompt sits at 0..P-1 (right-padded to the bucket,
pads invalid) and generated tokens follow, so each row needs only its own write index
(decoding.forward_cached with a per-row start).

Sampling per row (serving/batch_sampling.py): temperature, top_p and a key from the request's
seed; token i of choice c draws with fold_in(fold_in(key(seed), c), i), so a seeded request gives
the same text whatever else is being decoded beside it.

Log-probabilities (the API's `logprobs`, `echo`): every step also returns, per row, the log-probability
of the sampled token and the MAX_LOGPROBS most likely tokens under the model's own distribution
(log_softmax of the logits, before temperature and top-p, as evaluation scores them), computed here
from the logits beside the sampler. A prefill asked for the prompt's log-probabilities (a second
compilation per bucket) returns those of every prompt token after the first.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neon_qtg_jax.inference import decoding
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.serving.batch_sampling import sample_rows

log = logging.getLogger(__name__)

MIN_PREFILL_BUCKET = 16
MAX_LOGPROBS = 20  # top alternatives computed per token (OpenAI's chat top_logprobs allows up to 20)


class QueueFull(Exception):
  """More requests are waiting for a slot than serve.max_queue allows."""


class Draining(Exception):
  """The server is shutting down: it finishes what it has and takes nothing new."""


class NeverFits(Exception):
  """A request with more sequences than serve.max_queue: no wait would let it in."""


class TokenLogprob(NamedTuple):
  """One token with its log-probability and the most likely alternatives ((id, log-probability), best first)."""
  token: int
  logprob: float | None  # None: the first token of a prompt, which nothing precedes
  top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Event:
  """What one sequence produced since its last event (called on the engine thread).

  text: new text (stop strings and anything after them never appear); finish_reason: None while
  it runs, then "stop" (EOS or a stop string), "length" (max_tokens or the context) or "cancelled".
  """
  text: str
  completion_tokens: int
  finish_reason: str | None = None
  logprobs: tuple[TokenLogprob, ...] = ()          # the tokens sampled since the last event (request.logprobs)
  prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # the first event only (request.prompt_logprobs)


@dataclasses.dataclass
class SequenceRequest:
  prompt_ids: list[int]
  max_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  stop: tuple[str, ...] = ()
  seed: int = 0
  choice: int = 0            # fold-in for the n choices of one request
  ignore_eos: bool = False   # generate max_tokens whatever is sampled (benchmarks)
  logprobs: int | None = None  # None: none; k: each sampled token's log-probability and its k best alternatives
  prompt_logprobs: bool = False  # the prompt's tokens too (echo); max_tokens 0 then scores the prompt only
  emit: Callable[[Event], None] = lambda event: None


class StopText:
  """Incremental detokenization that holds back what might become a stop string.

  Decodes the generated ids after the prompt's last token, so a leading space that SentencePiece
  would drop at the start of a text is kept. A trailing U+FFFD (half of a multi-byte character)
  is held back until the next token completes it.
  """

  def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int], stop: tuple[str, ...]):
    self.decode = decode
    self.prefix = list(prompt_ids[-1:])
    self.prefix_text = decode(self.prefix)
    self.stop = tuple(s for s in stop if s)
    self.ids: list[int] = []
    self.sent = 0

  def _text(self) -> str:
    text = self.decode(self.prefix + self.ids)
    return text[len(self.prefix_text):] if text.startswith(self.prefix_text) else self.decode(self.ids)

  def push(self, token: int) -> tuple[str, bool]:
    """Adds a token: (text that is safe to send now, whether a stop string was reached)."""
    self.ids.append(token)
    text = self._text()
    hits = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
    if hits:
      end = max(min(hits), self.sent)
      delta, self.sent = text[self.sent:end], end
      return delta, True
    safe = len(text)
    for s in self.stop:
      for k in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:k]):
          safe = min(safe, len(text) - k)
          break
    while safe > self.sent and text[safe - 1] == "\ufffd":
      safe -= 1
    delta, self.sent = text[self.sent:safe], max(self.sent, safe)
    return delta, False

  def flush(self) -> str:
    """The text held back, at the end of a sequence that did not stop on a stop string."""
    text = self._text()
    delta, self.sent = text[self.sent:], len(text)
    return delta


class Sequence:
  """One choice being generated; `cancel()` (any thread) frees its slot before the next step."""

  def __init__(self, request: SequenceRequest, decode: Callable[[list[int]], str]):
    self.request = request
    self.text = StopText(decode, request.prompt_ids, request.stop)
    self.generated = 0
    self.slot: int | None = None
    self.cancelled = False
    self.finished = False
    self.submitted = time.monotonic()
    self.last_token_time: float | None = None
    self.unsent_logprobs: list[TokenLogprob] = []
    self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    key = jax.random.fold_in(jax.random.PRNGKey(request.seed), request.choice)
    self.key = np.asarray(jax.device_get(key), np.uint32)

  def cancel(self) -> None:
    self.cancelled = True


def prefill_bucket(length: int, context: int) -> int:
  """Prompt slots compiled for a prompt of `length` tokens: the next power of two from 16, at most the context."""
  bucket = MIN_PREFILL_BUCKET
  while bucket < length:
    bucket *= 2
  return min(bucket, context)


def _insert_row(cache: decoding.DecodeCache, row: decoding.DecodeCache, slot: jax.Array) -> decoding.DecodeCache:
  """cache with row (batch 1) written at batch index `slot`: layer-major buffers on axis 1, valid on axis 0."""
  def put(big, one, axis):
    return None if big is None else jax.lax.dynamic_update_slice_in_dim(big, one.astype(big.dtype), slot, axis)
  return decoding.DecodeCache(put(cache.keys, row.keys, 1), put(cache.values, row.values, 1),
                              put(cache.phi, row.phi, 1), put(cache.valid, row.valid, 0))


def token_logprobs(logits: jax.Array, tokens: jax.Array, valid_vocab: int | None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits (R, V), tokens (R,) -> log p(token) (R,), top ids (R, K), top log p (R, K): the model's own
  distribution (no temperature, no top-p), normalized over all of its V outputs as evaluation scores it
  (evaluation/loglik.py, perplexity.py); the K = MAX_LOGPROBS alternatives are among the tokenizer's ids."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
  decodable = logp
  if valid_vocab is not None and valid_vocab < logits.shape[-1]:
    decodable = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logp, -jnp.inf)
  top_logp, top_ids = jax.lax.top_k(decodable, min(MAX_LOGPROBS, valid_vocab or logits.shape[-1]))
  return chosen, top_ids.astype(jnp.int32), top_logp


@functools.partial(jax.jit, static_argnames=("graphdef", "valid_vocab", "prompt_logprobs"), donate_argnames=("cache",))
def prefill_into_slot(graphdef: nnx.GraphDef, state: nnx.State, cache: decoding.DecodeCache, slot: jax.Array,
                      tokens: jax.Array, length: jax.Array, temperature: jax.Array, top_p: jax.Array,
                      key: jax.Array, *, valid_vocab: int | None, prompt_logprobs: bool = False):
  """Prefills one prompt (tokens (1, P), `length` of them real) into cache row `slot`.

  Returns (first token, its token_logprobs, the prompt's token_logprobs for tokens 1..P-1 or None, cache).
  """
  model = nnx.merge(graphdef, state)
  row = decoding.init_cache(model, 1, cache.valid.shape[1])
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  logits, row = decoding.forward_cached(model, row, tokens, positions, 0, positions < length)
  last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, axis=0, keepdims=True)
  token = sample_rows(last, temperature[None], top_p[None], jax.random.fold_in(key, 0)[None], valid_vocab)
  prompt = token_logprobs(logits[0, :-1], tokens[0, 1:], valid_vocab) if prompt_logprobs else None
  return token[0], token_logprobs(last, token, valid_vocab), prompt, _insert_row(cache, row, slot)


@functools.partial(jax.jit, static_argnames=("graphdef", "valid_vocab"), donate_argnames=("cache",))
def decode_slots(graphdef: nnx.GraphDef, state: nnx.State, cache: decoding.DecodeCache, tokens: jax.Array,
                 positions: jax.Array, active: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array,
                 steps: jax.Array, *, valid_vocab: int | None):
  """One token for every slot: tokens, positions, active, temperature, top_p, steps (S,), keys (S, 2) ->
  (next tokens (S,), their token_logprobs, cache)."""
  model = nnx.merge(graphdef, state)
  logits, cache = decoding.forward_cached(model, cache, tokens[:, None], positions[:, None], positions,
                                          active[:, None])
  step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
  next_tokens = sample_rows(logits[:, 0], temperature, top_p, step_keys, valid_vocab)
  return next_tokens, token_logprobs(logits[:, 0], next_tokens, valid_vocab), cache


@dataclasses.dataclass
class EngineStats:
  decode_steps: int = 0
  prefills: int = 0
  max_prefills_between_decode_steps: int = 0
  generated_tokens: int = 0
  prompt_tokens: int = 0
  cancelled: int = 0


class Engine:
  """Runs sequences on `slots` cache rows in a background thread (start(), submit(), drain(), stop())."""

  def __init__(self, model: nnx.Module, decode: Callable[[list[int]], str], *, eos_id: int | None, slots: int,
               max_queue: int, sharding: ShardingConfig, valid_vocab: int | None = None, metrics=None):
    """sharding: the run's mesh and rules, where the model's parameters live; the cache is placed by the
    same rules (decoding.shard_cache).
    metrics: a serving.metrics.Metrics that records token counts and latencies (None: none)."""
    self.metrics = metrics
    self.cancel_reason: str | None = None  # set by cancel_all: what the clients of cancelled sequences are told
    self.graphdef, self.state = nnx.split(model)
    self.context = model.cfg.max_seq_len
    self.decode, self.eos_id, self.valid_vocab = decode, eos_id, valid_vocab
    self.num_slots, self.max_queue = slots, max_queue
    self.cache = decoding.shard_cache(decoding.init_cache(model, slots, self.context), sharding)
    self.slots: list[Sequence | None] = [None] * slots
    self.pending: collections.deque[Sequence] = collections.deque()
    self.tokens = np.zeros(slots, np.int32)
    self.positions = np.zeros(slots, np.int32)
    self.temperature = np.zeros(slots, np.float32)
    self.top_p = np.ones(slots, np.float32)
    self.keys = np.zeros((slots, 2), np.uint32)
    self.steps = np.zeros(slots, np.int32)
    self.stats = EngineStats()
    self.unfinished = 0  # submitted and not yet finished (queued, being prefilled or decoding)
    self._prefills_since_decode = 0
    self._lock = threading.Condition()
    self._draining = False
    self._stopping = False
    self._thread: threading.Thread | None = None
    self.error: BaseException | None = None

  # ---- called from other threads
  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
    self._thread.start()
    return self

  def submit(self, requests: list[SequenceRequest]) -> list[Sequence]:
    """Queues the sequences (all or none); raises Draining, NeverFits or QueueFull."""
    with self._lock:
      if self._draining or self._stopping or self.error is not None:
        raise Draining("the server is shutting down" if self.error is None else f"the engine failed: {self.error}")
      if len(requests) > self.max_queue:
        raise NeverFits(f"the request has {len(requests)} sequences (prompts x n); at most serve.max_queue="
                        f"{self.max_queue} can wait for a slot")
      if len(self.pending) + len(requests) > self.max_queue:
        raise QueueFull(f"{len(self.pending)} requests are waiting for a slot (serve.max_queue={self.max_queue})")
      sequences = [Sequence(r, self.decode) for r in requests]
      self.pending.extend(sequences)
      self.unfinished += len(sequences)
      self._lock.notify_all()
    return sequences

  def wake(self) -> None:
    with self._lock:
      self._lock.notify_all()

  def drain(self) -> None:
    """Takes no new sequences; those queued or running finish."""
    with self._lock:
      self._draining = True
      self._lock.notify_all()

  def cancel_all(self, reason: str) -> int:
    """Cancels every queued and running sequence (their clients get `reason`); returns how many."""
    with self._lock:
      self.cancel_reason = reason
      sequences = [s for s in self.slots if s is not None] + list(self.pending)
      for seq in sequences:
        seq.cancel()
      self._lock.notify_all()
    return len(sequences)

  def stop(self, timeout: float | None = None) -> None:
    """Cancels everything left and ends the thread."""
    with self._lock:
      self._stopping = True
      self._lock.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)

  @property
  def draining(self) -> bool:
    return self._draining

  @property
  def busy_slots(self) -> int:
    return sum(s is not None for s in self.slots)

  @property
  def queued(self) -> int:
    return len(self.pending)

  # ---- the engine thread
  def _run(self) -> None:
    try:
      while True:
        with self._lock:
          self._drop_cancelled()
          if self._stopping:
            break
          if not self.pending and self.busy_slots == 0:
            self._lock.wait(0.5)
            continue
          admit = self.pending.popleft() if self.pending and None in self.slots else None
        if admit is not None:
          self._admit(admit)
        if self.busy_slots:
          self._decode_step()
    except BaseException as err:  # noqa: BLE001 - reported to every waiting client, then re-raised in the log
      log.exception("engine failed")
      self.error = err
    with self._lock:
      left = [s for s in self.slots if s is not None] + list(self.pending)
      self.pending.clear()
    for seq in left:
      self._finish(seq, "cancelled")

  def _drop_cancelled(self) -> None:
    for seq in [s for s in self.pending if s.cancelled]:
      self.pending.remove(seq)
      self._finish(seq, "cancelled")
    for seq in self.slots:
      if seq is not None and seq.cancelled:
        self._finish(seq, "cancelled")

  def _admit(self, seq: Sequence) -> None:
    r = seq.request
    slot = self.slots.index(None)
    bucket = prefill_bucket(len(r.prompt_ids), self.context)
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :len(r.prompt_ids)] = r.prompt_ids
    token, first, prompt, self.cache = prefill_into_slot(
        self.graphdef, self.state, self.cache, jnp.int32(slot), jnp.asarray(tokens), jnp.int32(len(r.prompt_ids)),
        jnp.float32(r.temperature), jnp.float32(r.top_p), jnp.asarray(seq.key), valid_vocab=self.valid_vocab,
        prompt_logprobs=r.prompt_logprobs)
    self.stats.prompt_tokens += len(r.prompt_ids)
    if self.metrics is not None:
      self.metrics.prompt_tokens(len(r.prompt_ids))
    if prompt is not None:
      chosen, top_ids, top_logp = jax.device_get(prompt)
      n = len(r.prompt_ids) - 1
      seq.prompt_logprobs = (TokenLogprob(r.prompt_ids[0], None),) + tuple(
          _logprob_row(r.prompt_ids[i + 1], chosen[i], top_ids[i], top_logp[i], r.logprobs) for i in range(n))
    self.stats.prefills += 1
    self._prefills_since_decode += 1
    self.stats.max_prefills_between_decode_steps = max(self.stats.max_prefills_between_decode_steps,
                                                       self._prefills_since_decode)
    if r.max_tokens == 0:  # echo with max_tokens 0: the prompt's log-probabilities, nothing generated
      self._finish(seq, "length")  # the row written stays free
      return
    seq.slot = slot
    self.slots[slot] = seq
    self.positions[slot] = len(r.prompt_ids)
    self.temperature[slot], self.top_p[slot] = r.temperature, r.top_p
    self.keys[slot] = seq.key
    self._accept(seq, int(token), jax.device_get(first) if r.logprobs is not None else None, 0)

  def _decode_step(self) -> None:
    active = np.asarray([s is not None for s in self.slots])
    positions = np.where(active, self.positions, 0).astype(np.int32)
    steps = np.asarray([s.generated if s is not None else 0 for s in self.slots], np.int32)
    next_tokens, logprobs, self.cache = decode_slots(
        self.graphdef, self.state, self.cache, jnp.asarray(self.tokens), jnp.asarray(positions), jnp.asarray(active),
        jnp.asarray(self.temperature), jnp.asarray(self.top_p), jnp.asarray(self.keys), jnp.asarray(steps),
        valid_vocab=self.valid_vocab)
    wanted = any(s is not None and s.request.logprobs is not None for s in self.slots)
    next_tokens, logprobs = jax.device_get((next_tokens, logprobs if wanted else None))
    self.stats.decode_steps += 1
    self._prefills_since_decode = 0
    for slot, seq in enumerate(self.slots):
      if seq is not None:
        self.positions[slot] += 1
        self._accept(seq, int(next_tokens[slot]), logprobs, slot)

  def _accept(self, seq: Sequence, token: int, logprobs=None, row: int = 0) -> None:
    """Records a sampled token: the next decode input of the slot, text for the client, or the end.

    logprobs: token_logprobs of the step (host arrays), read at `row` when the request asks for them."""
    seq.generated += 1
    self.stats.generated_tokens += 1
    now = time.monotonic()
    if self.metrics is not None:
      self.metrics.token(now - (seq.last_token_time or seq.submitted), first=seq.last_token_time is None)
    seq.last_token_time = now
    if seq.request.logprobs is not None and logprobs is not None:
      chosen, top_ids, top_logp = logprobs
      seq.unsent_logprobs.append(_logprob_row(token, chosen[row], top_ids[row], top_logp[row], seq.request.logprobs))
    if self.eos_id is not None and token == self.eos_id and not seq.request.ignore_eos:
      self._finish(seq, "stop", seq.text.flush())
      return
    delta, stopped = seq.text.push(token)
    if stopped:
      self._finish(seq, "stop", delta)
    elif seq.generated >= seq.request.max_tokens or self.positions[seq.slot] >= self.context:
      self._finish(seq, "length", delta + seq.text.flush())
    else:
      self.tokens[seq.slot] = token
      if delta:
        self._emit(seq, Event(delta, seq.generated))

  def _finish(self, seq: Sequence, reason: str, delta: str = "") -> None:
    if seq.finished:
      return
    seq.finished = True
    if reason == "cancelled":
      self.stats.cancelled += 1
    with self._lock:
      self.unfinished -= 1
    if seq.slot is not None and self.slots[seq.slot] is seq:
      self.slots[seq.slot] = None
    self._emit(seq, Event(delta, seq.generated, reason))

  def _emit(self, seq: Sequence, event: Event) -> None:
    """Hands an event to the client; a client that cannot take it (its event loop is gone) is cancelled."""
    if seq.unsent_logprobs or seq.prompt_logprobs is not None:
      event = dataclasses.replace(event, logprobs=tuple(seq.unsent_logprobs), prompt_logprobs=seq.prompt_logprobs)
      seq.unsent_logprobs, seq.prompt_logprobs = [], None
    try:
      seq.request.emit(event)
    except Exception:  # noqa: BLE001 - one client's failure must not stop the others
      log.warning("could not deliver to a client; cancelling its sequence", exc_info=True)
      seq.cancel()


def _logprob_row(token: int, chosen, top_ids, top_logp, k: int | None) -> TokenLogprob:
  """A TokenLogprob from one row of token_logprobs, keeping the k best alternatives."""
  k = k or 0
  return TokenLogprob(int(token), float(chosen), tuple((int(i), float(v)) for i, v in zip(top_ids[:k], top_logp[:k])))


def wait_until_idle(engine: Engine, timeout: float) -> bool:
  """True once nothing is queued or running (polls; for tests and shutdown)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if engine.unfinished == 0:
      return True
    time.sleep(0.02)
  return False
