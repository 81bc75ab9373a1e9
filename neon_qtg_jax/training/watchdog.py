"""A thread that ends a training process stuck in a wait it cannot leave: a hung collective, or a stop signal
that the blocked main thread never gets to act on.

With several processes, a collective (an all-reduce in the step, the all-gathers of the initial state)
waits for every process. When one process stops before it (a frozen host, a crash the coordination
service has not noticed yet, a program that differs between processes) the others wait forever in
C++ with the Python interpreter idle: neither a Python exception nor a Python signal handler can run.
This thread can. It ends the process with one line naming the process, the phase and the last step
completed, and the main thread's Python stack, when

- no step completes for `training.collective_timeout_minutes` (exit status EXIT_HUNG), or
- SIGTERM or SIGINT arrived and the main thread, blocked, has completed no step for
  `training.stop_grace_seconds` since (exit status 128 + the signal's number): it cannot save a state
  it does not have.

XLA compiling a program (the first run of each step function) is slow, not hung: while the main
thread's Python stack is in JAX's compiler, the timeout's clock is held.

A stop waits for the phases entered with `awaited_by_stop` (a checkpoint save, an evaluation): the
grace does not run out during them, the timeout still does.

Signals reach the thread through `signal.set_wakeup_fd`: the interpreter's C-level handler writes the
signal's number there as it arrives, even while the main thread is blocked. That needs a Python
handler to be installed for the signal; `Watchdog.start` installs one that records the signal (the
training loop's PreemptionFlag replaces it while the loop runs) and gives back the previous handlers
on `close`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Callable, Iterator

from neon_qtg_jax.training.loop import Hook, StepContext
from neon_qtg_jax.training import preemption

log = logging.getLogger("neon_qtg_jax")

EXIT_HUNG = 3                          # no step completed within training.collective_timeout_minutes
SIGNALS = (signal.SIGTERM, signal.SIGINT)
COMPILER_FILE = "jax/_src/compiler.py"  # the main thread in there is compiling (compile_or_get_cached)
POLL_SECONDS = 1.0                     # how often the thread looks at the clock when nothing wakes it


@dataclasses.dataclass
class Phase:
  name: str                 # what the main thread is doing: "initialising the train state", "step"
  step: int                 # the last step completed
  since: float              # time.monotonic() when the phase began or the step completed
  awaited_by_stop: bool = False  # a stop signal waits for it to finish (a save): the grace does not apply


class Watchdog:
  """Use as `with Watchdog(...) as dog:`; `dog.beat(step)` after each step, `dog.phase(...)` around waits.

  timeout_minutes: no progress for this long ends the process (0: never). stop_grace_seconds: after a
  stop signal, how long a blocked main thread may go without completing a step. `who` names the process
  in the line (for example "process 1 of 2"). `exit` is os._exit: the main thread is blocked in C++, so
  nothing short of ending the process gets it out.
  """

  def __init__(self, timeout_minutes: float, stop_grace_seconds: float, who: str,
               exit: Callable[[int], None] = os._exit):  # pylint: disable=redefined-builtin
    self.timeout = 60.0 * timeout_minutes
    self.grace = stop_grace_seconds
    self.who = who
    self._exit = exit
    self._phase = Phase("initialising the train state", -1, time.monotonic())
    self._first_step = -1                                # the step the run started from (Watchdog.started)
    self._recorded = ""                                  # a stop signal _record saw
    self._signal: tuple[str, int, float] | None = None   # (name, number, monotonic time) of the first signal
    self._lock = threading.Lock()
    self._closed = threading.Event()
    self._main = threading.main_thread()
    self._thread: threading.Thread | None = None
    self._wakeup: tuple[socket.socket, socket.socket] | None = None
    self._previous_fd = -1
    self._previous_handlers: dict[int, object] = {}

  def __enter__(self) -> "Watchdog":
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def start(self) -> None:
    if threading.current_thread() is self._main:  # signal handlers and the wakeup fd belong to the main thread
      self._wakeup = socket.socketpair()
      for end in self._wakeup:
        end.setblocking(False)
      self._previous_fd = signal.set_wakeup_fd(self._wakeup[1].fileno(), warn_on_full_buffer=False)
      for sig in SIGNALS:
        self._previous_handlers[sig] = signal.signal(sig, self._record)
    self._thread = threading.Thread(target=self._watch, name="neon-qtg-watchdog", daemon=True)
    self._thread.start()

  def stop_watching(self) -> None:
    """Ends the thread (the run's last saves and uploads are not timed); the handlers stay until `close`."""
    self._closed.set()
    if self._thread is not None:
      self._thread.join(timeout=5 * POLL_SECONDS)

  def close(self) -> None:
    """Stops watching and gives back the signal handlers (after the loop's own flag gave back this one's)."""
    self.stop_watching()
    if self._wakeup is not None:
      signal.set_wakeup_fd(self._previous_fd)
      for sig, handler in self._previous_handlers.items():
        signal.signal(sig, handler)
      for end in self._wakeup:
        end.close()
      self._wakeup = None

  @property
  def stop_requested(self) -> str:
    """The name of a stop signal received before the loop took over the handlers, else ""."""
    return self._recorded

  def _record(self, signum: int, frame: FrameType | None) -> None:
    """The Python handler until the loop installs its own (the thread learns of signals through the wakeup fd)."""
    self._recorded = signal.Signals(signum).name
    log.warning("%s received before the first step: stopping once the train state is ready", self._recorded)
    self.receive_stop(signum)

  def receive_stop(self, signum: int) -> None:
    """Passes a stop signal on to the handler before this one: an enclosing run (a study) learns that it
    was asked to stop, also when the training loop's flag received it."""
    preemption.relay(self._previous_handlers.get(signum), signum)

  def started(self, step: int) -> None:
    """The train state is ready at `step` (0, or the checkpoint's): the loop's first step comes next."""
    with self._lock:
      self._first_step = step
      self._phase = Phase("step", step, time.monotonic())

  def beat(self, step: int) -> None:
    """Step `step` completed."""
    with self._lock:
      self._phase = Phase("step", step, time.monotonic())

  @contextlib.contextmanager
  def phase(self, name: str, awaited_by_stop: bool = False) -> Iterator[None]:
    """Within it the main thread is doing `name`. Entering and leaving count as progress."""
    with self._lock:
      outer = self._phase
      self._phase = Phase(name, outer.step, time.monotonic(), awaited_by_stop)
    try:
      yield
    finally:
      with self._lock:
        self._phase = dataclasses.replace(outer, since=time.monotonic())

  def _watch(self) -> None:
    while not self._closed.is_set():
      readable = [self._wakeup[0]] if self._wakeup is not None else []
      ready, _, _ = select.select(readable, [], [], POLL_SECONDS) if readable else ([], [], time.sleep(POLL_SECONDS))
      if ready:
        self._read_signals()
      if not self._closed.is_set():
        self._check(time.monotonic())

  def _read_signals(self) -> None:
    try:
      data = self._wakeup[0].recv(64)
    except (BlockingIOError, OSError):
      return
    for signum in data:
      if signum in (int(s) for s in SIGNALS) and self._signal is None:
        self._signal = (signal.Signals(signum).name, signum, time.monotonic())

  def _check(self, now: float) -> None:
    with self._lock:
      phase = self._phase
    if self._signal is not None and not phase.awaited_by_stop:
      name, number, at = self._signal
      waited = now - max(at, phase.since)
      if waited >= self.grace:
        if phase.step <= self._first_step:
          why = "no step has completed in this run, so there is no state newer than the one it started from"
        else:
          why = (f"the main thread, blocked, completed no step in the {waited:.0f} s since "
                 f"(training.stop_grace_seconds={self.grace:g}), so there is no state it can save")
        self._end(128 + number, f"{name} received while {self._where(phase)}; {why}: exiting without a save")
        return
    if self.timeout > 0 and now - phase.since >= self.timeout:
      if self._main_thread_compiling():
        with self._lock:
          if self._phase is phase:
            self._phase = dataclasses.replace(phase, since=now)
        return
      self._end(EXIT_HUNG, f"no progress for {(now - phase.since) / 60:.1f} min while {self._where(phase)} "
                           f"(training.collective_timeout_minutes={self.timeout / 60:g}): a collective is waiting "
                           "for a process that stopped or diverged; exiting")

  def _main_thread_compiling(self) -> bool:
    """Whether the main thread is inside JAX's compiler (jax/_src/compiler.py) now."""
    frame = sys._current_frames().get(self._main.ident)  # pylint: disable=protected-access
    while frame is not None:
      if frame.f_code.co_filename.replace(os.sep, "/").endswith(COMPILER_FILE):
        return True
      frame = frame.f_back
    return False

  def _where(self, phase: Phase) -> str:
    if phase.name == "step":
      return f"stalled after step {phase.step} (no later step reached the host)"
    if phase.step < 0:
      return f"{phase.name}, before the first step"
    return f"{phase.name} (the host had reached step {phase.step})"

  def _end(self, status: int, message: str) -> None:
    stack = sys._current_frames().get(self._main.ident)  # pylint: disable=protected-access
    where = "".join(traceback.format_stack(stack)[-8:]) if stack is not None else "(no Python stack)\n"
    log.error("watchdog: %s: %s (exit status %d); the main thread's Python stack:\n%s", self.who, message, status,
              where.rstrip())
    for handler in logging.getLogger().handlers + log.handlers:
      with contextlib.suppress(Exception):
        handler.flush()
    sys.stderr.flush()
    self._exit(status)


class Beat(Hook):
  """Tells the watchdog each completed step; placed last, so it stops watching before the other hooks close
  (the final save and the backup upload have their own timeouts)."""

  def __init__(self, dog: Watchdog):
    self.dog = dog

  def observe(self, ctx: StepContext) -> None:
    self.dog.beat(ctx.step)

  def close(self, loop) -> None:
    self.dog.stop_watching()

  def abort(self) -> None:
    self.dog.stop_watching()


def awaited_by_stop(hook: Hook, dog: Watchdog, name: str) -> Hook:
  """`hook` whose runs are a phase a stop signal waits for (a save, an evaluation), named `name` at step N."""
  run = hook.run

  def run_in_phase(ctx: StepContext, loop) -> None:
    with dog.phase(f"{name} at step {ctx.step}", awaited_by_stop=True):
      run(ctx, loop)

  hook.run = run_in_phase  # type: ignore[method-assign]
  return hook
