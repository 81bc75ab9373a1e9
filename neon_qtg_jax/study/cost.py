"""CPU time a study will take, from the seconds per training FLOP its finished runs measured.

Every result.json under a study directory (tuning runs included), and every run record of a
published study.json given as calibration (e.g. docs/results/study.json), gives run_seconds /
train_flops: training, compilation and scoring of one run, on the machine and load it ran under. A run still
to do is estimated with the measurement of the same group and variant, else of the same variant
name in any group, else the median of all; a wall-time run with its minutes. Runs run one after
another in one process, so the total is the wall time of `tools/study.py` on a machine like the
measured one.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import statistics

from neon_qtg_jax.study.runner import RESULT_FILE, run_workdir
from neon_qtg_jax.study.spec import Run, expected_seconds, train_flops_per_step


@dataclasses.dataclass
class Estimate:
  run: Run
  train_flops: float
  seconds: float | None    # measured (finished) or estimated; None without any measurement
  source: str              # "finished", "group/variant", "variant", "all runs", "wall time", "none"


def measured_rates(study_dir: str, calibration: str = "") -> dict[tuple[str, str], list[float]]:
  """Seconds per training FLOP of every finished run in study_dir (and in the study.json `calibration`),
  by (group, variant)."""
  records = []
  for path in glob.glob(os.path.join(study_dir, "*", "*", "*", "*", RESULT_FILE)):
    with open(path, encoding="utf-8") as f:
      records.append(json.load(f))
  if calibration:
    with open(calibration, encoding="utf-8") as f:
      published = json.load(f)
    records += published.get("runs", []) + published.get("tuning_runs", [])
  rates: dict[tuple[str, str], list[float]] = {}
  for record in records:
    if record.get("train_flops") and record.get("run_seconds"):
      rates.setdefault((record["group"], record["variant"]), []).append(record["run_seconds"] / record["train_flops"])
  return rates


def estimate(runs: list[Run], study_dir: str, calibration: str = "") -> list[Estimate]:
  rates = measured_rates(study_dir, calibration)
  by_variant: dict[str, list[float]] = {}
  for (_, variant), values in rates.items():
    by_variant.setdefault(variant, []).extend(values)
  every = [v for values in rates.values() for v in values]
  out = []
  for run in runs:
    flops = train_flops_per_step(run.config) * run.config.training.total_steps
    result = os.path.join(run_workdir(study_dir, run), RESULT_FILE)
    if os.path.exists(result):
      with open(result, encoding="utf-8") as f:
        out.append(Estimate(run, flops, float(json.load(f)["run_seconds"]), "finished"))
    elif run.budget["kind"] == "wall_time":
      out.append(Estimate(run, flops, expected_seconds(run, 0.0), "wall time"))
    elif (run.group, run.variant) in rates:
      out.append(Estimate(run, flops, expected_seconds(run, statistics.median(rates[run.group, run.variant])),
                          "group/variant"))
    elif run.variant in by_variant:
      out.append(Estimate(run, flops, expected_seconds(run, statistics.median(by_variant[run.variant])), "variant"))
    elif every:
      out.append(Estimate(run, flops, expected_seconds(run, statistics.median(every)), "all runs"))
    else:
      out.append(Estimate(run, flops, None, "none"))
  return out
