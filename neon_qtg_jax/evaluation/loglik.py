"""Log-likelihood of continuations given contexts, batched: the scoring step of multiple-choice benchmarks."""

from __future__ import annotations

import sys
from typing import Callable, Protocol

import numpy as np
from tqdm import tqdm

from neon_qtg_jax.evaluation.perplexity import LogProbFn

LENGTH_BUCKET = 64  # sequences are right-padded to a multiple of this: few compiled shapes
# inputs, targets (B, W) -> (log p of each target, whether each target is the argmax), each (B, W)
ScoreFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class TextEncoder(Protocol):
  eos_id: int

  def encode(self, text: str) -> list[int]: ...


def pair_tokens(tokenizer: TextEncoder, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
  """EOS + context + continuation as ids, cut on the left to max_length + 1; returns (ids, continuation length)."""
  cont = tokenizer.encode(continuation)
  if not cont:
    raise ValueError(f"continuation {continuation!r} encodes to no tokens")
  ids = [tokenizer.eos_id] + tokenizer.encode(context) + cont
  return ids[-(max_length + 1):], len(cont)


def continuation_log_likelihoods(log_prob_fn: LogProbFn, sequences: list[tuple[list[int], int]], *,
                                 max_length: int, batch_size: int, progress: bool = True) -> np.ndarray:
  """Sum of log p over the last n tokens of each (ids, n) sequence given the tokens before them -> (N,) float64."""
  def with_no_greedy(inputs, targets):
    return log_prob_fn(inputs, targets), np.zeros(inputs.shape, bool)
  return continuation_scores(with_no_greedy, sequences, max_length=max_length, batch_size=batch_size,
                             progress=progress)[0]


def continuation_scores(score_fn: ScoreFn, sequences: list[tuple[list[int], int]], *, max_length: int,
                        batch_size: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(sum of log p over the last n tokens of each (ids, n) sequence, whether each of them was the argmax) -> (N,), (N,).

  Sequences are sorted by length so that similar lengths share a batch, right-padded to a multiple
  of LENGTH_BUCKET (at most max_length) and scored batch_size at a time.
  """
  order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))  # similar lengths batch together
  scores = np.zeros(len(sequences), np.float64)
  greedy = np.zeros(len(sequences), bool)
  starts = range(0, len(order), batch_size)
  for start in tqdm(starts, desc="log-likelihood", unit="batch", disable=not progress, file=sys.stdout):
    chosen = order[start:start + batch_size]
    longest = max(len(sequences[i][0]) - 1 for i in chosen)
    width = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, max_length)
    inputs = np.zeros((batch_size, width), np.int32)
    targets = np.zeros((batch_size, width), np.int32)
    scored = np.zeros((batch_size, width), bool)
    for row, i in enumerate(chosen):
      ids, n = sequences[i]
      inputs[row, :len(ids) - 1] = ids[:-1]
      targets[row, :len(ids) - 1] = ids[1:]
      scored[row, len(ids) - 1 - n:len(ids) - 1] = True
    logp, is_argmax = score_fn(inputs, targets)
    logp = np.asarray(logp, np.float64)
    scores[chosen] = np.sum(np.where(scored, logp, 0.0), axis=1)[:len(chosen)]
    greedy[chosen] = np.all(np.asarray(is_argmax) | ~scored, axis=1)[:len(chosen)]
  return scores, greedy
