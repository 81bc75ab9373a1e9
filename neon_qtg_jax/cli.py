"""What launch.py hands to each mode: the validated config plus the run's command-line arguments."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import ml_collections

# mode -> "module:function"; each function is run(config, args) -> exit code (None means 0).
MODES: dict[str, str] = {
    "info": "neon_qtg_jax.info:run",
    "prepare": "neon_qtg_jax.data.prepare:run",
    "train": "neon_qtg_jax.training.trainer:run",
    "memory_report": "neon_qtg_jax.training.memory_report:run",
    "memory_test": "neon_qtg_jax.training.memory_report:run",  # the former name of memory_report, still accepted
    "eval": "neon_qtg_jax.evaluation.perplexity:run",
    "generate": "neon_qtg_jax.inference.generate_mode:run",
    "serve": "neon_qtg_jax.serving.server:run",
}


@dataclasses.dataclass(frozen=True)
class RunArgs:
  workdir: str = "runs/default"
  resume_from: str = ""        # a step number, "best", "latest", "backup" or a checkpoint path
  checkpoint: str = "best"     # what eval/generate restore: a step, "best", "latest", a path or a backup URL
  info_format: str = "text"    # "text" or "json"
  prompt: str = ""
  prompts_file: str = ""
  eval_data: str = ""          # JSONL or text file for --mode=eval; empty: a prepared split (eval_split)
  eval_split: str = "val"      # eval: the prepared split scored without eval_data, "val" or "tune"
  output: str = ""             # result file; empty: a default under the workdir
  overwrite: bool = False      # eval: replace an earlier result of the same name
  verify: bool = False         # prepare: read every data file against the manifest's checksums
  target: str = ""             # memory_report: compile for e.g. "h200:8" (parallel/targets); empty: local devices
  host: str = "127.0.0.1"      # serve: the address to listen on
  port: int = 8000             # serve: the TCP port


def mode_function(mode: str) -> Callable[[ml_collections.ConfigDict, RunArgs], int | None]:
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}: must be one of {sorted(MODES)}")
  module_name, function_name = MODES[mode].split(":")
  return getattr(importlib.import_module(module_name), function_name)
