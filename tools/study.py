"""Runs a study (a grid of training runs from a study file), scores every final checkpoint and writes
study.json, plots, TensorBoard curves and a report. Resumable: finished runs are skipped and an
interrupted run resumes from its checkpoint, so the same command completes a study. With an lr
grid in the study file, the tuning runs come first and choose each variant's learning rate.

  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study
  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study --publish=docs/RESULTS.md \
      --recall_dir=runs/recall
  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study --report_only --publish=docs/RESULTS.md
  python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study --list   # runs, FLOPs, CPU time

A finished run is reused only when its whole config equals what the study file gives now; a run
made under other settings is reported as stale and not reused (--rerun_stale moves it aside and
runs it again). Exit code 1 when a run failed or is stale.

Several processes can share one --out: each holds a lock on the run it trains, and the others skip
it. With --wait a process passes over the study again (every --wait_seconds while it has nothing to
run) until every run it selects has a result, so N copies of one command keep N cores busy:

  for i in 1 2; do python tools/study.py --study=studies/qtg_vs_gpt.py --out=runs/study --wait \
      --groups=tiny_stdlib,tiny_fortunes,tiny_stdlib_wall > runs/study_worker$i.log 2>&1 & done
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neon_qtg_jax.config import ConfigError  # noqa: E402
from neon_qtg_jax.study import cost, recall_table, report, runner, spec  # noqa: E402


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


def _hours(seconds: float) -> str:
  return f"{seconds / 3600:.2f} h"


def print_plan(runs: list[spec.Run], study_dir: str, calibration: str = "") -> None:
  """--list: every run in order with its steps, FLOPs and estimated CPU time, and the totals."""
  estimates = cost.estimate(runs, study_dir, calibration)
  for e in estimates:
    t = e.run.config.training
    lr = "lr from grid" if e.run.pending_lr else f"lr {e.run.lr:g}"
    seconds = f"{e.seconds / 60:7.1f} min ({e.source})" if e.seconds is not None else "   n/a"
    print(f"{e.run.key:<44} tier {e.run.tier}  {lr:<13} {t.total_steps:>6} steps  {e.train_flops:.3e} train FLOPs  "
          f"{seconds}")
  steps = sum(e.run.config.training.total_steps for e in estimates)
  flops = sum(e.train_flops for e in estimates)
  tuning = sum(e.run.phase == "tune" for e in estimates)
  print(f"total: {len(runs)} runs ({tuning} lr tuning runs), {steps:,} steps, {flops:.3e} train FLOPs")
  known = [e for e in estimates if e.seconds is not None]
  done = sum(e.seconds for e in known if e.source == "finished")
  left = sum(e.seconds for e in known if e.source != "finished")
  unknown = len(estimates) - len(known)
  where = study_dir + (f" and {calibration}" if calibration else "")
  if unknown:
    print(f"CPU time: {unknown} run(s) without an estimate: no finished run in {where} to measure seconds per FLOP "
          "(run a few, or pass --calibrate_from=STUDY.json of runs on this machine, e.g. docs/results/study.json); "
          f"the {len(known)} other(s): {_hours(done + left)}, {_hours(done)} done")
    return
  print(f"CPU time (one process, runs one after another, at the seconds per FLOP measured in {where}): "
        f"{_hours(done + left)} in all, {_hours(done)} done, {_hours(left)} left")


def _quiet(line: str) -> None:
  """print for a later --wait pass: what it runs, not its header or what another process holds."""
  if not line.startswith("study: ") and "being run by another process" not in line:
    print(line, flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--study", required=True, help="a study file (Python module with get_study())")
  p.add_argument("--out", default="runs/study", help="study directory: one workdir per run, study.json, plots")
  p.add_argument("--publish", default="", help="also write the report here (e.g. docs/RESULTS.md), plots beside it")
  p.add_argument("--recall_dir", default=None,
                 help="tools/recall.py JSON results for the report's first table (default: the study's recall_dir)")
  p.add_argument("--report_only", action="store_true", help="run nothing; report the finished runs")
  p.add_argument("--republish_from", default="",
                 help="a published study.json (docs/results/study.json): write --publish from it again with this "
                      "study file's study-wide fields (decision rule, notes, sweep), without the run directories")
  p.add_argument("--reuse_published", default="",
                 help="a published study.json (docs/results/study.json): a run without a workdir in --out takes its "
                      "record from there when that record's config equals the run's (fields added to the config since, "
                      "at their defaults, count as equal) and its data fingerprint equals the data prepared here; the "
                      "others run, and records whose data cannot be compared are reused and listed in the report")
  p.add_argument("--list", action="store_true",
                 help="print the runs in order with steps, FLOPs and CPU time estimated from --out's finished runs")
  p.add_argument("--calibrate_from", default="",
                 help="--list: also measure seconds per FLOP on this study.json's runs (docs/results/study.json)")
  p.add_argument("--max_hours", type=float, default=0.0, help="start no new run after this long (0: no limit)")
  p.add_argument("--rerun_stale", action="store_true",
                 help="move a run made under other settings aside (WORKDIR.staleN) and run it again")
  p.add_argument("--require_same_code", action="store_true",
                 help="treat a run made by other code than this checkout's (commit and uncommitted changes) as stale")
  p.add_argument("--wait", action="store_true",
                 help="pass over the study again until every selected run has a result, while runs are left that "
                      "other processes hold or whose tuning they run; a failed or stale run, a stop signal or "
                      "--max_hours ends it")
  p.add_argument("--wait_seconds", type=float, default=60.0, help="--wait: pause after a pass that ran nothing")
  p.add_argument("--analyze", action="store_true",
                 help="run tools/analyze.py on the first seed of every finished variant (once; kept in its workdir)")
  p.add_argument("--groups", default="",
                 help="run only these groups (comma-separated) and write no report: several processes can share "
                      "one --out, one group each; write the report afterwards with --report_only")
  p.add_argument("--variants", default="",
                 help="comma-separated variant names: run (or list) only these variants' runs, e.g. to run the "
                      "headline pair first; like --groups, no report")
  args = p.parse_args(argv)
  try:
    study = spec.load_study(args.study)
    all_runs = runs = spec.expand(study)
  except (ConfigError, ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  if args.republish_from:
    if not args.publish:
      print("error: --republish_from needs --publish", file=sys.stderr)
      return 2
    report.republish(study, args.republish_from, args.publish)
    print(f"study: {args.publish} written from {args.republish_from}")
    return 0
  if args.groups:
    groups = args.groups.split(",")
    unknown = sorted(set(groups) - {g["name"] for g in study["groups"]})
    if unknown:
      print(f"error: --groups: no group {unknown} in {args.study}", file=sys.stderr)
      return 2
    runs = [r for r in runs if r.group in groups]
  if args.variants:
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - {v["name"] for g in study["groups"] for v in g["variants"]})
    if unknown:
      print(f"error: --variants: no variant {unknown} in {args.study}", file=sys.stderr)
      return 2
    runs = [r for r in runs if r.variant in variants]
  if args.list:
    print_plan(runs, args.out, args.calibrate_from)
    return 0
  # The tuning runs that the selected runs take their learning rates from but that another call runs.
  needed = {(r.lr_group, r.variant) for r in runs if r.pending_lr}
  selected = {r.key for r in runs}
  read = [r for r in all_runs if r.phase == "tune" and (r.group, r.variant) in needed and r.key not in selected]
  runs = read + runs
  recall_dir = study.get("recall_dir", "") if args.recall_dir is None else args.recall_dir
  if recall_dir:
    try:
      recall_table.read_results(recall_dir)  # a bad result file stops before hours of training, not after
    except ValueError as err:
      print(f"error: {err}", file=sys.stderr)
      return 2
  try:
    published = runner.Published.load(args.reuse_published, spec.base_config(study)) if args.reuse_published else None
  except (OSError, ValueError, KeyError, TypeError) as err:
    print(f"error: --reuse_published={args.reuse_published}: not a readable published study.json "
          f"({type(err).__name__}: {err})", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  deadline = time.monotonic() + 3600 * args.max_hours if args.max_hours else 0.0
  waiting = False
  for passes in itertools.count(1):
    outcome = runner.run_all(runs, args.out, execute=not args.report_only, rerun_stale=args.rerun_stale,
                             require_same_code=args.require_same_code,
                             stop_after_seconds=max(deadline - time.monotonic(), 1e-9) if deadline else 0.0,
                             read_only=frozenset(r.key for r in read), published=published,
                             print_fn=print if passes == 1 else _quiet)
    if (not args.wait or args.report_only or not outcome.pending or outcome.failures or outcome.stale
        or outcome.stopped_by or outcome.out_of_time):
      break
    if not outcome.ran:
      if not waiting:
        print(f"study: {len(outcome.pending)} run(s) left to other processes or their tuning; passing again every "
              f"{args.wait_seconds:g} s until they finish", flush=True)
      time.sleep(args.wait_seconds)
    waiting = not outcome.ran
  if args.groups or args.variants:
    finished = [r for r in outcome.records + outcome.tuning if r["key"] in selected]
    print(f"study: groups {args.groups or 'all'}, variants {args.variants or 'all'}: "
          f"{len(finished)}/{len(selected)} runs finished; no report "
          "(--groups/--variants)")
    return 1 if outcome.failures else 0
  if args.analyze:
    analyze_first_seeds(outcome.records)
  command = f"python tools/study.py --study={args.study} --out={args.out}"
  if args.publish:
    command += f" --publish={args.publish}"
  if recall_dir:
    command += f" --recall_dir={recall_dir}"
  if args.reuse_published:
    command += f" --reuse_published={args.reuse_published}"
  if args.analyze:
    command += " --analyze"
  result = report.write_report(study, outcome, len(runs), args.out, command, args.publish, recall_dir)
  print(f"study: {result['runs_finished']}/{result['runs_planned']} runs finished; "
        f"{os.path.join(args.out, 'study.json')}, {os.path.join(args.out, 'report.md')}"
        + (f", {args.publish}" if args.publish else ""))
  for line in outcome.stale:
    print(f"stale: {line}", file=sys.stderr)
  if outcome.unchecked:
    print(f"study: {len(outcome.unchecked)} published record(s) reused without comparing their data with the data "
          "prepared here (listed in the report)", file=sys.stderr)
  for line in outcome.failures:
    print(f"failed: {line}", file=sys.stderr)
  return 1 if outcome.failures or outcome.stale else 0


if __name__ == "__main__":
  sys.exit(main())
