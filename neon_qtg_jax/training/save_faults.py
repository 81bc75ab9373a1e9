"""What a checkpoint save can fail on: the error it raises, and the free-space check made before each save.

Kept free of JAX and Orbax imports so launch.py can name the error without loading them.
"""

from __future__ import annotations

import shutil

FREE_SPACE_MARGIN = 2.0  # warn when the disk holds less than this many checkpoints' worth of free space


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, file too large, I/O error); earlier steps are intact."""


def free_space_warning(directory: str, nbytes: int) -> str | None:
  """A warning when `directory`'s file system has less than FREE_SPACE_MARGIN x nbytes free, else None."""
  free = shutil.disk_usage(directory).free
  if free >= FREE_SPACE_MARGIN * nbytes:
    return None
  return (f"only {free / 2**30:.2f} GiB free in {directory}; a checkpoint takes up to {nbytes / 2**30:.2f} GiB: "
          "the next saves may fail (free space, or lower training.keep_checkpoints)")
