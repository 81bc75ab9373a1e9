"""Decisions every process must take together, and the one process that writes.

A save, a stop or a checkpoint fallback that one process takes alone leaves the others waiting in
a collective for ever. Each process proposes from its own clock, signals and errors; `agree`
all-gathers the proposals (one tiny collective) and every process acts on their OR.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_writer() -> bool:
  """Process 0 writes logs, metrics, TensorBoard, plots and samples; checkpoints go through Orbax."""
  return jax.process_index() == 0


def agree(proposals: Mapping[str, bool]) -> dict[str, bool]:
  """{name: True on every process if any process proposed it}; no communication with one process."""
  names = sorted(proposals)
  if jax.process_count() == 1:
    return {name: bool(proposals[name]) for name in names}
  local = np.array([bool(proposals[name]) for name in names], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(local))  # (processes, len(names))
  return {name: bool(gathered[:, i].any()) for i, name in enumerate(names)}


def all_succeeded(ok: bool) -> bool:
  """True on every process only if `ok` held on every process."""
  return not agree({"failed": not ok})["failed"]
