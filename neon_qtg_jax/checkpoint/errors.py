"""What checkpoint reads and writes fail with, and the free-space check made before each save.

Kept free of JAX and Orbax imports so launch.py can name the errors without loading them.
"""

from __future__ import annotations

import shutil

FREE_SPACE_MARGIN = 2.0  # warn when the disk holds less than this many checkpoints' worth of free space


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, file too large, I/O error); earlier steps are intact.

  detail: what failed, without what the run does about it (the message may add "stopping ...").
  """

  def __init__(self, message: str, detail: str | None = None):
    super().__init__(message)
    self.detail = detail or message


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose arrays do not fit this run's model or optimizer (a changed config).

  Nothing is moved or deleted: the checkpoint is fine, the config is not the one it was written with.
  """


class CheckpointUnreadableError(RuntimeError):
  """The checkpoint the user named (--resume_from) cannot be read; it was moved aside (kept, not deleted)."""


class BackupError(RuntimeError):
  """A backup step or file that is missing, incomplete or differs from its index."""


def free_space_warning(directory: str, nbytes: int) -> str | None:
  """A warning when `directory`'s file system has less than FREE_SPACE_MARGIN x nbytes free, else None."""
  free = shutil.disk_usage(directory).free
  if free >= FREE_SPACE_MARGIN * nbytes:
    return None
  return (f"only {free / 2**30:.2f} GiB free in {directory}; a checkpoint takes up to {nbytes / 2**30:.2f} GiB: "
          "the next saves may fail (free space, or lower training.keep_checkpoints)")
