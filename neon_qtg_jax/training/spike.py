"""The guard against a run going bad: training.max_consecutive_nonfinite skipped steps stop it (exit 1)."""

from __future__ import annotations

import logging

import jax

from neon_qtg_jax.checkpoint.checkpointer import Checkpointer
from neon_qtg_jax.training.loop import Hook, Loop, StepContext

log = logging.getLogger("neon_qtg_jax")

EXIT_UNSTABLE = 1


class SpikeGuard(Hook):
  """At each log step: after max_consecutive_nonfinite skipped steps in a row, stop without saving."""

  def __init__(self, log_steps: int, max_consecutive_nonfinite: int, checkpointer: Checkpointer):
    self.every, self.at_last = log_steps, True
    self.max_nonfinite, self.checkpointer = max_consecutive_nonfinite, checkpointer

  def run(self, ctx: StepContext, loop: Loop) -> None:
    peak = int(jax.device_get(ctx.state.nonfinite_peak))
    if peak < self.max_nonfinite:
      return
    steps = self.checkpointer.steps()
    log.error("stopping: %d consecutive steps had a non-finite loss or gradient (training.max_consecutive_nonfinite="
              "%d); the last good checkpoint is step %s in %s", peak, self.max_nonfinite,
              steps[-1] if steps else "none", self.checkpointer.directory)
    loop.stop("non-finite", EXIT_UNSTABLE)
    ctx.dropped = True
