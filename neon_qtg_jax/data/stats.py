"""Token statistics shared by the loader, the report and the trainer's baseline."""

from __future__ import annotations

import numpy as np

from neon_qtg_jax.data.sources import DataError


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
  """Occurrences of each id, int64 (vocab_size,); reads a memmap in chunks."""
  counts = np.zeros((vocab_size,), dtype=np.int64)
  for start in range(0, len(tokens), chunk):
    counts += np.bincount(np.asarray(tokens[start:start + chunk]), minlength=vocab_size)[:vocab_size]
  return counts


def unigram_perplexity(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
  """Perplexity on val_tokens of an add-one smoothed unigram model fit on train_tokens."""
  counts = token_counts(train_tokens, vocab_size) + 1
  log_p = np.log(counts) - np.log(counts.sum())
  val_counts = token_counts(val_tokens, vocab_size)
  if val_counts.sum() == 0:
    raise DataError("unigram perplexity needs at least one validation token")
  return float(np.exp(-(val_counts * log_p).sum() / val_counts.sum()))
