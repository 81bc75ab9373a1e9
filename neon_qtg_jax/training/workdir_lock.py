"""One training run per workdir: process 0 holds an exclusive lock on `{workdir}/train.lock` for the whole run.

The lock is `flock(2)` on an open descriptor: the kernel releases it when the process ends, however
it ends (kill -9 included), so a lock is never left stale. The file itself stays; it holds the
holder's pid, host and start time, which a refused run names. Kept free of JAX imports so launch.py
can name the errors without loading it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

LOCK_FILE = "train.lock"
_held: dict[str, "WorkdirLock"] = {}  # this process's locks: a run that raised left its lock to the next one here


class WorkdirError(RuntimeError):
  """The workdir cannot be used: another run holds it, or it cannot be written. launch.py: one line, exit 2."""


class WorkdirLock:
  """The held lock (see acquire); release() or the end of the process frees it."""

  def __init__(self, path: str, fd: int | None):
    self.path, self._fd = path, fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None
    if _held.get(self.path) is self:
      del _held[self.path]


def _holder(fd: int) -> str:
  try:
    text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").split()
    fields = dict(part.split("=", 1) for part in text if "=" in part)
  except OSError:
    fields = {}
  if "pid" not in fields:
    return "another process (it has not written its pid yet)"
  since = f", since {fields['since']}" if "since" in fields else ""
  return f"pid {fields['pid']} on host {fields.get('host', '?')}{since}"


def acquire(workdir: str, writer: bool = True) -> WorkdirLock:
  """Takes the workdir's lock for this run (process 0 only: `writer`); WorkdirError when another run holds it.

  Also the first write into the workdir: a workdir that cannot be created or written is a
  WorkdirError naming the path, before any other file is touched.
  """
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  if not writer:
    return WorkdirLock(path, None)
  if path in _held:  # an earlier run of this process (runs in one process follow each other) that raised
    _held[path].release()
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  except OSError as err:
    raise WorkdirError(f"workdir {workdir} cannot be written ({err.strerror or err}: {err.filename or path}); "
                       "choose a writable --workdir") from err
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    raise WorkdirError(f"workdir {workdir} is in use by another training run ({holder}; {path}); wait for it "
                       "to end or choose another --workdir") from None
  except OSError as err:  # a file system without locks
    os.close(fd)
    raise WorkdirError(f"workdir {workdir}: cannot lock {path} ({err.strerror or err})") from err
  text = f"pid={os.getpid()} host={socket.gethostname()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
  except OSError as err:  # the lock is held; a full disk only loses the holder's description
    if err.errno not in (28, 27):  # ENOSPC, EFBIG
      os.close(fd)
      raise WorkdirError(f"workdir {workdir} cannot be written ({err.strerror}: {path})") from err
  lock = _held[path] = WorkdirLock(path, fd)
  return lock
