"""Runs a study's grid one run after another: train, score the final checkpoint, collect a record.

Each run has its own workdir (STUDY/runs/GROUP/VARIANT/seedN). A run whose result.json
exists is skipped; an interrupted run resumes from its latest checkpoint (the trainer's own
resume). The trainer's console output goes to the run's outputs/logs/console.txt so that the
study prints one line per run with the overall ETA.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from neon_qtg_jax import info
from neon_qtg_jax.cli import RunArgs
from neon_qtg_jax.study.spec import Run, train_flops_per_step


def run_workdir(study_dir: str, run: Run) -> str:
  return os.path.join(study_dir, "runs", run.group, run.variant, f"seed{run.seed}")


def _val_curve(metrics_path: str, tokens_per_step: int, flops_per_step: float) -> list[dict[str, float]]:
  """Validation cross-entropy (the fixed eval batches) at every evaluation of the run."""
  from neon_qtg_jax.training.metric_writers import read_jsonl  # pylint: disable=import-outside-toplevel
  by_step = {r["step"]: r["val/ce"] for r in read_jsonl(metrics_path) if "val/ce" in r}
  return [{"step": s, "tokens": s * tokens_per_step, "flops": s * flops_per_step, "val_ce": by_step[s]}
          for s in sorted(by_step)]


def learned_gamma(workdir: str, config: Any) -> list[list[float]] | None:
  """softplus(gamma_raw) per layer and head of the latest checkpoint; None for dot-product attention."""
  from neon_qtg_jax.inference.restore import load_model  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.parallel import ShardingConfig  # pylint: disable=import-outside-toplevel
  model = load_model(workdir, "latest", config, sharding=ShardingConfig.from_config(config.parallel)).model
  gamma = model.blocks.attn.gamma()
  return None if gamma is None else np.asarray(jax.device_get(gamma), np.float64).round(4).tolist()


def train_and_score(run: Run, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run, scores its final checkpoint on the full validation split; the record."""
  from neon_qtg_jax.evaluation import perplexity  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.checkpoint import checkpointer  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.training import trainer  # pylint: disable=import-outside-toplevel
  config = run.config
  os.makedirs(os.path.join(workdir, "outputs", "logs"), exist_ok=True)
  console = os.path.join(workdir, "outputs", "logs", "console.txt")
  started = time.perf_counter()
  with (open(console, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(out)):
    code = trainer.run(config, RunArgs(workdir=workdir))
    if code:
      raise RuntimeError(f"{run.key}: training exited with code {code} (log: {console})")
    meta = checkpointer.load_meta(workdir, "latest")
    if meta["step"] < config.training.total_steps and run.budget["kind"] != "wall_time":
      raise RuntimeError(f"{run.key}: stopped at step {meta['step']} of {config.training.total_steps} (log: {console})")
    eval_path = os.path.join(workdir, "eval", "final.json")
    code = perplexity.run(config, RunArgs(workdir=workdir, checkpoint="latest", output=eval_path))
    if code:
      raise RuntimeError(f"{run.key}: --mode=eval exited with code {code} (log: {console})")
    gamma = learned_gamma(workdir, config)
  with open(eval_path, encoding="utf-8") as f:
    final = json.load(f)
  summary = info.summarize(config)
  t = config.training
  tokens_per_step = summary["tokens_per_step"]
  flops_per_step = train_flops_per_step(config)
  curve = _val_curve(os.path.join(workdir, "outputs", "logs", "metrics.jsonl"), tokens_per_step, flops_per_step)
  best = min(curve, key=lambda p: p["val_ce"]) if curve else None
  steps = int(meta["step"])
  breakdown = summary["params_breakdown"]
  return {
      "key": run.key, "group": run.group, "variant": run.variant, "label": run.label, "seed": run.seed,
      "tier": run.tier, "overrides": run.overrides, "budget": run.budget, "workdir": os.path.abspath(workdir),
      "params": summary["params"],
      "non_embedding_params": sum(v for k, v in breakdown.items() if k.startswith("blocks.")),
      "train_flops_per_token": summary["flops_per_token"]["train"],
      "tokens_per_step": tokens_per_step, "steps": steps, "planned_steps": t.total_steps,
      "tokens": steps * tokens_per_step, "train_flops": steps * flops_per_step,
      "train_seconds": float(meta["train_seconds"]), "run_seconds": time.perf_counter() - started,
      "final": {"loss": final["loss"], "perplexity": final["perplexity"], "bits_per_byte": final["bits_per_byte"],
                "tokens": final["tokens"], "checkpoint_step": final["checkpoint_step"]},
      "best_val_ce": best["val_ce"] if best else None, "best_val_step": best["step"] if best else None,
      "best_val_perplexity": math.exp(best["val_ce"]) if best else None,
      "gamma": gamma, "curve": curve,
  }


def stale_reason(record: dict[str, Any], run: Run) -> str:
  """Why a finished run's record does not belong to this run of the study file ('' when it does)."""
  overrides = json.loads(json.dumps(run.overrides))
  if record["overrides"] != overrides:
    return f"overrides {record['overrides']} != {overrides}"
  if record["planned_steps"] != run.config.training.total_steps:
    return f"steps {record['planned_steps']} != {run.config.training.total_steps}"
  return ""


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def run_all(runs: list[Run], study_dir: str, *, print_fn: Callable[[str], None] = print,
            stop_after_seconds: float = 0.0) -> tuple[list[dict[str, Any]], list[str]]:
  """Runs every missing run in order; returns (records of all finished runs, failures).

  The ETA scales the measured seconds per training FLOP of the runs finished in this call
  (compilation and scoring included) to the FLOPs of the runs still to do. With
  stop_after_seconds > 0 no new run starts after that many seconds.
  """
  records, failures = [], []
  todo = [r for r in runs if not os.path.exists(os.path.join(run_workdir(study_dir, r), "result.json"))]
  done_flops = done_seconds = 0.0
  started = time.perf_counter()
  print_fn(f"study: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run")
  index = len(runs) - len(todo)
  for run in runs:
    workdir = run_workdir(study_dir, run)
    result_path = os.path.join(workdir, "result.json")
    if os.path.exists(result_path):
      with open(result_path, encoding="utf-8") as f:
        record = json.load(f)
      mismatch = stale_reason(record, run)
      if mismatch:
        failures.append(f"{run.key}: {result_path} was made by a different study file ({mismatch}); "
                        "use another --out or delete that run's workdir")
        print_fn(f"[{run.key}] {failures[-1]}")
      else:
        records.append(record)
      continue
    if stop_after_seconds and time.perf_counter() - started > stop_after_seconds:
      print_fn(f"study: time limit reached; {len(runs) - index} runs left for a later call (resumable)")
      break
    index += 1
    run_start = time.perf_counter()
    try:
      record = train_and_score(run, workdir)
    except Exception as err:  # pylint: disable=broad-except
      failures.append(f"{run.key}: {type(err).__name__}: {err}")
      print_fn(f"[{index}/{len(runs)}] {run.key} FAILED: {err}")
      continue
    with open(result_path, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
    records.append(record)
    elapsed = time.perf_counter() - run_start
    done_flops += record["train_flops"]
    done_seconds += elapsed
    remaining = [r for r in runs[runs.index(run) + 1:]
                 if not os.path.exists(os.path.join(run_workdir(study_dir, r), "result.json"))]
    eta = done_seconds / done_flops * sum(train_flops_per_step(r.config) * r.config.training.total_steps
                                          for r in remaining)
    print_fn(f"[{index}/{len(runs)}] {run.key}: {record['steps']} steps, bits/byte "
             f"{record['final']['bits_per_byte']:.4f}, ppl {record['final']['perplexity']:.2f}, "
             f"{_duration(elapsed)} | {len(remaining)} left, ETA {_duration(eta)}")
  return records, failures
