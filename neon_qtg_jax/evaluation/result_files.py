"""Result file names that say what was evaluated, and the rule that an earlier result is never overwritten.

  result_path(workdir, "perplexity", "val", step=121, settings={"len": 512, "stride": 256})
    -> WORKDIR/eval/perplexity_val_len512_stride256_step121.json

A data file is named by its base name plus a short hash of its absolute path (two files called
test.jsonl in different directories do not collide).

claim(path, overwrite) reserves a result before the work starts by creating it, empty, with
O_CREAT | O_EXCL: of two evaluations naming the same result only one goes on, and an earlier
result is never replaced unless overwrite is set (--overwrite in launch.py and the tools).
`claimed(paths, overwrite)` does that for all of a run's files (JSON, PNG, samples) and removes
its still-empty placeholders when the run fails; write_json then replaces a placeholder atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from typing import Any, Iterator, Sequence


class ResultExistsError(FileExistsError):
  """The result file is already there; the caller did not pass --overwrite."""


def data_tag(path: str | None, default: str) -> str:
  """`default` for no path, else the file's base name (no extension) and 6 hex digits of its absolute path."""
  if not path:
    return default
  absolute = os.path.abspath(path)
  stem = os.path.splitext(os.path.basename(absolute.rstrip("/")))[0] or "data"
  return f"{_safe(stem)}-{hashlib.sha1(absolute.encode()).hexdigest()[:6]}"


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def result_name(kind: str, data: str, *, step: int, settings: dict[str, Any] | None = None) -> str:
  """"{kind}_{data}_{key}{value}..._step{step}": settings in the given order, values made file-name safe."""
  parts = [kind, data] + [f"{key}{_safe(str(value))}" for key, value in (settings or {}).items()]
  return "_".join(parts) + f"_step{step}"


def result_path(workdir: str, kind: str, data: str, *, step: int, settings: dict[str, Any] | None = None,
                suffix: str = ".json") -> str:
  return os.path.join(workdir, "eval", result_name(kind, data, step=step, settings=settings) + suffix)


def claim(path: str, overwrite: bool) -> str:
  """Creates path empty (O_EXCL) and returns it; ResultExistsError naming it and the way out if it exists.

  With overwrite the path is returned as it is (created or replaced when the result is written).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if overwrite:
    return path
  try:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
  except FileExistsError:
    if _is_placeholder(path):
      raise ResultExistsError(f"{path} is claimed by another evaluation (an empty file: one running now, or one "
                              "killed before it wrote its result); delete it or pass --overwrite") from None
    raise ResultExistsError(f"{path} already holds an earlier result; pass --overwrite to replace it, "
                            "or --output=PATH to write elsewhere") from None
  return path


@contextlib.contextmanager
def claimed(paths: Sequence[str], overwrite: bool) -> Iterator[list[str]]:
  """claim()s every path before the block; if the block (or a later claim) raises, removes the placeholders it made."""
  made: list[str] = []
  try:
    for path in paths:
      claim(path, overwrite)
      if not overwrite:
        made.append(path)
    yield list(paths)
  except BaseException:
    for path in made:
      if _is_placeholder(path):
        os.remove(path)
    raise


def _is_placeholder(path: str) -> bool:
  try:
    return os.path.getsize(path) == 0
  except FileNotFoundError:
    return False
