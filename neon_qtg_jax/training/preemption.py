"""SIGTERM / SIGINT turn into a flag the training loop checks after each step."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionFlag:
  """Within `with PreemptionFlag() as flag:`, the first SIGTERM or SIGINT sets `flag.requested`.

  A second SIGINT raises KeyboardInterrupt, so an impatient Ctrl-C still stops the process.
  Outside the main thread (where handlers cannot be installed) the flag never fires. On exit the
  handlers before it come back, and a signal it received is passed on to an enclosing flag (a study
  that runs trainings learns that it was asked to stop); never to another handler (Python's SIGINT
  handler would raise KeyboardInterrupt), so a preempted training still exits normally.
  """

  def __init__(self):
    self.requested = False
    self.signal_name = ""
    self._signum = 0
    self._previous: dict[int, object] = {}

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self._signum = signum
    self.signal_name = signal.Signals(signum).name
    log.warning("%s received: finishing the current step, saving a checkpoint and exiting", self.signal_name)

  def __enter__(self) -> "PreemptionFlag":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def receive_stop(self, signum: int) -> None:
    """A stop signal that a handler nested inside this one received (see `relay`)."""
    self._handle(signum, None)

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if self.requested:
      relay(self._previous.get(self._signum), self._signum)


def relay(handler: object, signum: int) -> None:
  """Passes a stop signal on to `handler`, the one installed before a nested handler, when it belongs to
  an object with `receive_stop` (an enclosing PreemptionFlag, or the training watchdog, which passes it
  on again); never to Python's or the default handlers."""
  receive = getattr(getattr(handler, "__self__", None), "receive_stop", None)
  if receive is not None:
    receive(signum)
