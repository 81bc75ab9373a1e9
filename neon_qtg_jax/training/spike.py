"""The loss-spike guard: roll a run that went bad back to its last good checkpoint, skip the batches, go on.

Two kinds of event, checked on the host from each step's loss (read at log steps, evaluation steps
and before every save, so no checkpoint is written after an unchecked step):

- a loss spike: a finite loss above the running mean by training.spike_sigmas running standard
  deviations (exponential averages over about training.spike_window steps of the losses that
  were not spikes; checked once that many steps were seen; spike_sigmas 0 turns this off);
- training.max_consecutive_nonfinite non-finite steps in a row (the train step already skips
  each one, keeping parameters and optimizer state; this is the NaN guard as one case of the same).

On an event the run goes back to its newest checkpoint (every checkpoint predates the event), with
the data position left where it is: the batches since that checkpoint, the bad one included, are
skipped. The learning rate is multiplied by training.spike_lr_scale (1: unchanged; kept in the
checkpoints). After training.spike_max_rollbacks rollbacks within training.spike_rollback_window
steps, or with no checkpoint to go back to, the run stops with exit code 1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import jax
import ml_collections

from neon_qtg_jax.checkpoint.checkpointer import Checkpointer
from neon_qtg_jax.training.loop import Hook, Loop, StepContext
from neon_qtg_jax.training.resume import Progress

log = logging.getLogger("neon_qtg_jax")

EXIT_UNSTABLE = 1


@dataclasses.dataclass
class LossStats:
  """Exponential running mean and variance of the losses (alpha = 1 / window) and how many were seen."""
  window: int
  mean: float = 0.0
  var: float = 0.0
  count: int = 0

  def is_spike(self, loss: float, sigmas: float) -> bool:
    return sigmas > 0 and self.count >= self.window and loss > self.mean + sigmas * math.sqrt(self.var)

  def add(self, loss: float) -> None:
    if self.count == 0:
      self.mean = loss
    else:
      alpha = 1.0 / self.window
      delta = loss - self.mean
      self.mean += alpha * delta
      self.var = (1 - alpha) * (self.var + alpha * delta * delta)
    self.count += 1


@dataclasses.dataclass(frozen=True)
class Event:
  step: int
  kind: str        # "spike" or "non-finite"
  detail: str


class SpikeGuard(Hook):
  """Checks every step's loss at the steps `due` says; rolls back or gives up on an event."""

  def __init__(self, config: ml_collections.ConfigDict, checkpointer: Checkpointer, progress: Progress, *,
               restore: Callable[[list[int]], tuple[int, Any, dict[str, Any]]],
               make_step: Callable[[float], Callable], also_due: Callable[[StepContext], bool]):
    """restore(steps): the newest readable of the checkpoint steps as (step, TrainState, meta);
    make_step(lr_scale): the train step with the learning rate scaled; also_due(ctx): whether other
    hooks read the state or save at this step (the guard checks first)."""
    t = config.training
    self.sigmas, self.max_nonfinite = t.spike_sigmas, t.max_consecutive_nonfinite
    self.max_rollbacks, self.rollback_window, self.lr_factor = (t.spike_max_rollbacks, t.spike_rollback_window,
                                                                t.spike_lr_scale)
    self.checkpointer, self.progress, self.restore, self.make_step, self.also_due = (checkpointer, progress, restore,
                                                                                     make_step, also_due)
    self.stats = LossStats(t.spike_window)
    self.pending: list[tuple[int, Any, Any]] = []   # (step, loss, finite) still on the device
    self.streak = 0

  def start(self, loop: Loop) -> None:
    self.streak = int(jax.device_get(loop.state.nonfinite_streak))

  def observe(self, ctx: StepContext) -> None:
    self.pending.append((ctx.step, ctx.metrics["loss"], ctx.metrics["finite"]))

  def due(self, ctx: StepContext, scheduled: bool) -> bool:
    return scheduled or self.also_due(ctx)

  def _scan(self) -> Event | None:
    """Runs the fetched losses through the statistics in step order; the first event, if any."""
    fetched, self.pending = jax.device_get(self.pending), []
    for step, loss, finite in fetched:
      loss = float(loss)
      if not bool(finite):
        self.streak += 1
        if self.streak >= self.max_nonfinite:
          return Event(step, "non-finite", f"{self.streak} consecutive steps had a non-finite loss or gradient "
                                           f"(training.max_consecutive_nonfinite={self.max_nonfinite})")
        continue
      self.streak = 0
      if self.stats.is_spike(loss, self.sigmas):
        return Event(step, "spike", f"loss {loss:.4f} above the running mean {self.stats.mean:.4f} + "
                                    f"{self.sigmas:g} x std {math.sqrt(self.stats.var):.4f} (training.spike_sigmas)")
      self.stats.add(loss)
    return None

  def run(self, ctx: StepContext, loop: Loop) -> None:
    event = self._scan()
    if self.stats.count:
      ctx.scalars.update({"spike/loss_mean": self.stats.mean, "spike/loss_std": math.sqrt(self.stats.var)})
    if event is None:
      return
    ctx.dropped = True
    recent = [s for s in self.progress.rollbacks if s > event.step - self.rollback_window]
    steps = self.checkpointer.steps()
    if len(recent) >= self.max_rollbacks or not steps:
      why = (f"after {len(recent)} rollback(s) within {self.rollback_window} steps (training.spike_max_rollbacks="
             f"{self.max_rollbacks})" if steps else "with no checkpoint to roll back to")
      log.error("stopping at step %d: %s, %s; the last good checkpoint is step %s in %s", event.step, event.detail,
                why, steps[-1] if steps else "none", self.checkpointer.directory)
      loop.stop(event.kind, EXIT_UNSTABLE)
      return
    scale = self.progress.lr_scale * self.lr_factor
    restored_step, state, meta = self.restore(steps)
    train_step = self.make_step(scale) if scale != self.progress.lr_scale else None
    self.progress.lr_scale, self.progress.best_val_loss = scale, meta["best_val_loss"]
    self.progress.rollbacks.append(event.step)
    self.streak = int(jax.device_get(state.nonfinite_streak))
    log.warning("step %d: %s; rolled back to checkpoint %d, skipping the batches of steps %d..%d (the data position "
                "moves on); learning rate x %g; rollback %d of %d allowed within %d steps", event.step, event.detail,
                restored_step, restored_step + 1, ctx.step, scale, len(recent) + 1, self.max_rollbacks,
                self.rollback_window)
    ctx.scalars.update({"spike/rollbacks": float(len(self.progress.rollbacks)), "spike/rolled_back_to": restored_step,
                        "spike/lr_scale": scale, "spike/event_step": float(event.step)})
    loop.rewind(state, restored_step, train_step)
