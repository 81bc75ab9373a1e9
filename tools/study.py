"""Runs a study (a grid of training runs from a study file), scores every final checkpoint and writes
study.json, plots, TensorBoard curves and a report. Resumable: finished runs are skipped and an
interrupted run resumes from its checkpoint, so the same command completes a study.

  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study
  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study --publish=docs/RESULTS.md
  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study --report_only --publish=docs/RESULTS.md
  python tools/study.py --study=studies/qtg_vs_gpt.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neon_qtg_jax.config import ConfigError  # noqa: E402
from neon_qtg_jax.study import report, runner, spec  # noqa: E402


def analyze_first_seeds(records: list[dict]) -> None:
  """tools/analyze.py on the lowest finished seed of each variant, unless its analysis/summary.json exists."""
  import analyze  # pylint: disable=import-outside-toplevel  # tools/analyze.py, beside this file
  first: dict[tuple[str, str], dict] = {}
  for record in sorted(records, key=lambda r: r["seed"]):
    first.setdefault((record["group"], record["variant"]), record)
  for record in first.values():
    out_dir = os.path.join(record["workdir"], "analysis")
    if not os.path.exists(os.path.join(out_dir, "summary.json")):
      print(f"analyze: {record['key']}")
      analyze.analyze(record["workdir"], "latest", 8, out_dir)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--study", required=True, help="a study file (Python module with get_study())")
  p.add_argument("--out", default="runs/study", help="study directory: one workdir per run, study.json, plots")
  p.add_argument("--publish", default="", help="also write the report here (e.g. docs/RESULTS.md), plots beside it")
  p.add_argument("--report_only", action="store_true", help="run nothing; report the finished runs")
  p.add_argument("--list", action="store_true", help="print the runs in order with their steps and exit")
  p.add_argument("--max_hours", type=float, default=0.0, help="start no new run after this long (0: no limit)")
  p.add_argument("--analyze", action="store_true",
                 help="run tools/analyze.py on the first seed of every finished variant (once; kept in its workdir)")
  args = p.parse_args(argv)
  try:
    study = spec.load_study(args.study)
    runs = spec.expand(study)
  except (ConfigError, ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  if args.list:
    for run in runs:
      t = run.config.training
      print(f"{run.key:<40} tier {run.tier}  {t.total_steps:>6} steps  "
            f"{spec.train_flops_per_step(run.config) * t.total_steps:.3e} train FLOPs")
    return 0
  os.makedirs(args.out, exist_ok=True)
  if args.report_only:
    records, failures = [], []
    for run in runs:
      path = os.path.join(runner.run_workdir(args.out, run), "result.json")
      if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
          record = json.load(f)
        mismatch = runner.stale_reason(record, run)
        if mismatch:
          failures.append(f"{run.key}: made by a different study file ({mismatch})")
        else:
          records.append(record)
  else:
    records, failures = runner.run_all(runs, args.out, stop_after_seconds=3600 * args.max_hours)
  if args.analyze:
    analyze_first_seeds(records)
  command = f"python tools/study.py --study={args.study} --out={args.out}"
  if args.publish:
    command += f" --publish={args.publish}"
  if args.analyze:
    command += " --analyze"
  result = report.write_report(study, records, failures, len(runs), args.out, command, args.publish)
  print(f"study: {result['runs_finished']}/{result['runs_planned']} runs finished; "
        f"{os.path.join(args.out, 'study.json')}, {os.path.join(args.out, 'report.md')}"
        + (f", {args.publish}" if args.publish else ""))
  for failure in failures:
    print(f"failed: {failure}", file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
