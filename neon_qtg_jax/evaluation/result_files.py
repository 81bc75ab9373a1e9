"""Result file names that say what was evaluated, and the rule that an earlier result is never overwritten.

  result_path(workdir, "perplexity", "val", step=121, settings={"len": 512, "stride": 256})
    -> WORKDIR/eval/perplexity_val_len512_stride256_step121.json

A data file is named by its base name plus a short hash of its absolute path (two files called
test.jsonl in different directories do not collide). claim(path, overwrite) refuses a path that
exists unless overwrite is set (--overwrite in launch.py and the tools).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any


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
  """Returns path when it is free (or overwrite is set); else ResultExistsError naming it and the way out."""
  if os.path.exists(path) and not overwrite:
    raise ResultExistsError(f"{path} already holds an earlier result; pass --overwrite to replace it, "
                            "or --output=PATH to write elsewhere")
  return path
