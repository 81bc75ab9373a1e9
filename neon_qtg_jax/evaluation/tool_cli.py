"""What the benchmark CLIs under tools/ share: checkpoint arguments, JSON results, clean errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from neon_qtg_jax.data.sources import DataError
from neon_qtg_jax.evaluation.result_files import ResultExistsError


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", required=True, help="training run directory (or a checkpoint path)")
  parser.add_argument("--checkpoint", default="best", help="a step, 'best', 'latest' or a path")
  add_overwrite_arg(parser)


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--overwrite", action="store_true", help="replace an earlier result of the same name")


def write_json(path: str, obj: Any) -> None:
  """Writes obj as indented JSON to a path claimed before the work (result_files.claimed), atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def run_tool(main: Callable[[], int]) -> None:
  """Runs a tool's main and exits with its code; bad paths, data or endpoints exit 2 with one line."""
  try:
    sys.exit(main())
  except (FileNotFoundError, ResultExistsError, DataError, ValueError, RuntimeError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
