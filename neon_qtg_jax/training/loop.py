"""The training loop: fetch a batch, run the step, agree on the step's decisions, run the hooks that are due.

Everything else a run does (logging, evaluation, samples, checkpoints, the backup, profiling, the
spike guard, stopping) is a Hook. Each step:

1. every hook `observe`s the step (cheap bookkeeping on the host; no device sync) and `propose`s
   its flags (a signal arrived, time is up, a save failed);
2. the proposals are agreed across processes (`decisions.StepAgreement`: this step's with one
   process, the previous step's with several) into one `Agreed` record every hook reads;
3. the hooks `due` at this step `run` in their order; a hook may stop the loop, or drop the rest of
   the step (a rollback); the step's scalars are then written as one record.

A hook gets its schedule when it is registered, `loop.add_hook(hook, every=N, at_last=True)` (as
Levanter's `add_hook(fn, every=N)`), not in its constructor: the loop keeps the hook and its
`Schedule` together, and asks `hook.due(ctx, scheduled)` with whether the schedule falls on the step.

The host keeps at most one step in flight: once step k is dispatched it waits for step k - 1's
results before it reads the step's flags. Otherwise it runs ahead of the device until the next
sync point (a log step), and a stop signal seen at host step k would be acted on while the device
was still many steps behind (15 steps with log_steps 50): the save would come that much later.
While the device computes step k the host prepares step k + 1, so the device is never idle.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax

from neon_qtg_jax.parallel.decisions import Agreed, StepAgreement


@dataclasses.dataclass
class Stop:
  """Why the loop ended: the reason logged, the process exit code, an error raised after clean-up."""
  reason: str
  exit_code: int = 0
  error: Exception | None = None


@dataclasses.dataclass
class StepContext:
  """One step as the hooks see it. `scalars` is written as one record once the hooks ran."""
  step: int
  state: Any                  # the TrainState after the step
  metrics: Mapping[str, Any]  # the step's metrics, still on the device
  agreed: Agreed
  last: bool                  # the final step: evaluate, sample and save now (total_steps or time is up)
  data_wait: float            # seconds spent fetching this step's batch
  scalars: dict[str, float] = dataclasses.field(default_factory=dict)
  val_loss: float | None = None   # set by the evaluation hook at an evaluation step
  improved: bool = False          # ... and whether it is the best so far
  dropped: bool = False           # a hook ended this step early (rollback, stop): later hooks skip it


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When a hook runs by count: at multiples of `every` (0: never by count) and, with at_last, at the final step."""
  every: int = 0
  at_last: bool = False

  def __call__(self, ctx: StepContext) -> bool:
    return bool(self.every and ctx.step % self.every == 0) or (self.at_last and ctx.last)


@dataclasses.dataclass(frozen=True)
class Scheduled:
  """A registered hook and the schedule it was registered with."""
  hook: "Hook"
  schedule: Schedule


class Hook:
  """Something the loop does at some steps; subclasses override what they need. The schedule is the
  registration's (Loop.add_hook), not the hook's."""
  proposals: tuple[str, ...] = ()   # the flags `propose` may raise

  def start(self, loop: "Loop") -> None:
    """Before the first step."""

  def observe(self, ctx: StepContext) -> None:
    """Every step, before the agreement: host bookkeeping only."""

  def propose(self, step: int) -> Mapping[str, bool]:
    """Every step: this process's flags for the agreement."""
    return {}

  def due(self, ctx: StepContext, scheduled: bool) -> bool:
    """Whether to run at this step; `scheduled`: the registration's schedule falls on it."""
    return scheduled

  def run(self, ctx: StepContext, loop: "Loop") -> None:
    """At the steps `due` says."""

  def close(self, loop: "Loop") -> None:
    """After the last step; hooks close in reverse order (the last save finishes before the backup waits)."""

  def rewound(self, step: int) -> None:
    """The loop went back to `step` (Loop.rewind): drop what was kept about the later steps."""

  def abort(self) -> None:
    """Instead of close() when the loop raised: release what start() took (signal handlers, a trace)."""


class Loop:
  """The steps from `step` to total_steps and the hooks. Hooks may replace state, step or train_step."""

  in_flight: int | None = 1  # steps dispatched ahead of the last finished one; None: unbounded (benchmarks)

  def __init__(self, *, train_step: Callable[[Any, Any], tuple[Any, Any]], next_batch: Callable[[], Any],
               total_steps: int, write_scalars: Callable[[int, Mapping[str, float]], None]):
    self.train_step, self.next_batch = train_step, next_batch
    self.total_steps, self.write_scalars = total_steps, write_scalars
    self.scheduled: list[Scheduled] = []  # in the order the hooks act at a step
    self.state: Any = None
    self.step = 0
    self.stopped: Stop | None = None

  def add_hook(self, hook: Hook, *, every: int = 0, at_last: bool = False) -> Hook:
    """Registers `hook` after the others, due at multiples of `every` (0: never by count) and, with
    at_last, at the final step, besides the steps its own `due` adds; returns it."""
    if any(entry.hook is hook for entry in self.scheduled):
      raise ValueError(f"{type(hook).__name__} is registered already")
    self.scheduled.append(Scheduled(hook, Schedule(every, at_last)))
    return hook

  @property
  def hooks(self) -> list[Hook]:
    return [entry.hook for entry in self.scheduled]

  def is_due(self, hook: Hook, ctx: StepContext) -> bool:
    """Whether the registered `hook` runs at this step (its schedule and its own `due`)."""
    entry = next(entry for entry in self.scheduled if entry.hook is hook)
    return entry.hook.due(ctx, entry.schedule(ctx))

  def rewind(self, state: Any, step: int, train_step: Callable | None = None) -> None:
    """Continues from an earlier state (the spike guard's rollback); the data iterator is not rewound."""
    self.state, self.step = state, step
    self.train_step = train_step or self.train_step
    for hook in self.hooks:
      hook.rewound(step)

  def stop(self, reason: str, exit_code: int = 0, error: Exception | None = None) -> None:
    if self.stopped is None:
      self.stopped = Stop(reason, exit_code, error)

  def run(self, state: Any, step: int) -> Stop:
    self.state, self.step = state, step
    agreement = StepAgreement(tuple(sorted({name for hook in self.hooks for name in hook.proposals})))
    for hook in self.hooks:
      hook.start(self)
    try:
      self._steps(agreement)
    except BaseException:
      for hook in reversed(self.hooks):
        hook.abort()
      raise
    for hook in reversed(self.hooks):
      hook.close(self)
    return self.stopped or Stop("finished")

  def _steps(self, agreement: StepAgreement) -> None:
    dispatched: list[Any] = []  # the metrics of the steps that may still be running, oldest first
    while self.step < self.total_steps and self.stopped is None:
      fetch_start = time.perf_counter()
      batch = self.next_batch()
      fetched = time.perf_counter()
      self.state, metrics = self.train_step(self.state, batch)
      self.step += 1
      dispatched.append(metrics)
      if self.in_flight is not None and len(dispatched) > self.in_flight:
        jax.block_until_ready(jax.tree.leaves(dispatched.pop(0))[:1])  # one output: the step is done
      ctx = StepContext(self.step, self.state, metrics, Agreed(self.step, {}), self.step == self.total_steps,
                        fetched - fetch_start)
      proposals: dict[str, bool] = {}
      for hook in self.hooks:
        hook.observe(ctx)
        for name, value in hook.propose(self.step).items():
          proposals[name] = proposals.get(name, False) or bool(value)
      ctx.agreed = agreement.step(self.step, proposals)
      ctx.last = ctx.last or ctx.agreed["out_of_time"]
      for hook in self.hooks:
        if not ctx.dropped and self.is_due(hook, ctx):
          hook.run(ctx, self)
      self.write_scalars(ctx.step, ctx.scalars)
