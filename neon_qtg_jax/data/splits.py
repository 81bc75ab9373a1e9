"""Which split a document belongs to, from a 64-bit hash of its text: val, tune (optional) or train.

With u = hash / 2**64 (prepare.document_hash):
  val    u < data.val_fraction
  tune   data.val_fraction <= u < data.val_fraction + data.tune_fraction   (only when tune_fraction > 0)
  train  everything else
so the validation split does not depend on tune_fraction, the tuning documents come out of what
would otherwise be train, and exact duplicates always share a split. The tuning split is for
choices (learning rate, defaults) that the validation split must not see.

With tune_fraction = 0 nothing about tune is written (no tune.bin, no is_tune statistic, no
settings key): the directory is byte-identical to one prepared before the tuning split existed.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from neon_qtg_jax.data.manifest import SPLITS

TUNE = "tune"


def split_names(tune_fraction: float) -> tuple[str, ...]:
  """The splits a directory prepared with this tune_fraction holds."""
  return SPLITS + ((TUNE,) if tune_fraction > 0 else ())


def _threshold(fraction: float) -> np.uint64:
  return np.uint64(fraction * 2.0**64)


def split_masks(hashes: np.ndarray, val_fraction: float, tune_fraction: float = 0.0) -> dict[str, np.ndarray]:
  """{split: bool (N,)} for uint64 hashes (N,); disjoint, together every document once."""
  is_val = hashes < _threshold(val_fraction)
  if tune_fraction <= 0:
    return {"train": ~is_val, "val": is_val}
  is_tune = ~is_val & (hashes < _threshold(val_fraction + tune_fraction))
  return {"train": ~(is_val | is_tune), "val": is_val, TUNE: is_tune}


def mask_fields(masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The per-document statistics that record the split: is_val, and is_tune when there is a tuning split."""
  return {"is_val": masks["val"]} | ({"is_tune": masks[TUNE]} if TUNE in masks else {})


def stats_masks(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The split masks recorded in per-document statistics (the inverse of mask_fields)."""
  is_val = np.asarray(stats["is_val"], bool)
  if "is_tune" not in stats:
    return {"train": ~is_val, "val": is_val}
  is_tune = np.asarray(stats["is_tune"], bool)
  return {"train": ~(is_val | is_tune), "val": is_val, TUNE: is_tune}
