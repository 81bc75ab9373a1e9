"""`data.filters`: the corpus pre-filtered by a datatrove pipeline before tokenization.

  config, files = filter_corpus(config, files, issues)   # prepare.py; a no-op when data.filters is ""

Steps (STEPS), in the order given, or the preset "fineweb" (all of them, FineWeb's settings):
length, gopher_repetition, gopher_quality, c4, fineweb_quality, exact_dedup, minhash. The
datatrove side (pipeline steps, stages) is `filter_steps.py`, imported only when filters are on,
so this module, the config and preparation without filters work without datatrove installed.

Layout of data_dir/filter/:
  plan.json                 input files, pieces, tasks and settings; a change restarts filtering
  NN_<stage>/               one datatrove job per stage: its logging folder (completions/, logs/,
                            stats/, stats.json), with output/{rank:05d}.jsonl for passes that
                            keep documents, tally/ (removals per step), issues/ (bad input)
  summary.json              removals per step, examples, bad input, timings (the report reads it)
Tokenization reads the last stage's output/ as data.source=jsonl, in task order, which is the
input order of the kept documents whatever the number of tasks.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import sys
import threading
import time
from typing import Any

from neon_qtg_jax.config import FILTER_PRESETS, FILTER_STEPS, FILTER_TOKENIZERS, parse_filters
from neon_qtg_jax.data import plans
from neon_qtg_jax.data import sources as src
from neon_qtg_jax.data.sources import DataError, Issues

STEPS, PRESETS = FILTER_STEPS, FILTER_PRESETS
WORD_STEPS = ("gopher_repetition", "gopher_quality", "c4", "fineweb_quality", "minhash")   # use data.filter_tokenizer
TOKENIZERS = FILTER_TOKENIZERS
FILTER_DIR = "filter"
PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"
EXTRA = "pip install -e '.[filters]' (datatrove, spaCy, xxhash, orjson)"
PLAN_VERSION = 1


def filter_settings(config) -> dict[str, Any]:
  """The filter fields a prepared directory depends on (part of its settings fingerprint); {} without filters.

  data.filter_tasks is not among them: the kept documents do not depend on it."""
  d = config.data
  steps = parse_filters(d.filters)
  if not steps:
    return {}
  out: dict[str, Any] = {"data.filters": ",".join(steps)}
  if set(steps) & set(WORD_STEPS):
    out["data.filter_tokenizer"] = d.filter_tokenizer
  if "length" in steps:
    out.update({"data.filter_min_words": int(d.filter_min_words), "data.filter_max_words": int(d.filter_max_words)})
  if "minhash" in steps:
    out.update({"data.minhash_ngrams": int(d.minhash_ngrams), "data.minhash_buckets": int(d.minhash_buckets),
                "data.minhash_hashes_per_bucket": int(d.minhash_hashes_per_bucket)})
  return out


def missing_packages() -> list[str]:
  return [name for name in ("datatrove", "spacy", "xxhash", "orjson") if importlib.util.find_spec(name) is None]


def require_datatrove(config) -> None:
  """DataError naming the field and the extra when data.filters is set but its packages are missing."""
  missing = missing_packages()
  if missing:
    raise DataError(f"config field 'data.filters' = {config.data.filters!r} needs the `filters` extra "
                    f"(missing: {', '.join(missing)}): {EXTRA}; or set data.filters=''")


def num_tasks(config) -> int:
  """datatrove tasks per pass: data.filter_tasks, else data.num_workers, at least 1."""
  d = config.data
  return max(1, int(d.filter_tasks or d.num_workers))


def filter_root(data_dir: str) -> str:
  return os.path.join(data_dir, FILTER_DIR)


def _log(progress: bool, message: str) -> None:
  if progress:
    print(message, file=sys.stderr, flush=True)


def plan_filtering(config, files: list[str], issues_out: Issues | None = None):
  """(settings, pieces, stages, plan dict) for the config's filters over `files` (needs datatrove)."""
  from neon_qtg_jax.data import filter_steps as fs

  d = config.data
  plan_issues = Issues()
  pieces = fs.plan_pieces(files, d.source, plan_issues)
  settings = fs.FilterSettings(
      steps=parse_filters(d.filters), source=d.source, text_field=d.text_field, text_split=d.text_split,
      tasks=num_tasks(config), min_words=int(d.filter_min_words), max_words=int(d.filter_max_words),
      minhash=fs.minhash_config(int(d.minhash_ngrams), int(d.minhash_buckets), int(d.minhash_hashes_per_bucket)),
      tokenizer=d.filter_tokenizer)
  root = filter_root(d.data_dir)
  stages = fs.build_stages(settings, pieces, root)
  plan = {
      "version": PLAN_VERSION, "datatrove": importlib.metadata.version("datatrove"), "settings": filter_settings(config),
      "source": d.source, "text_field": d.text_field, "text_split": d.text_split, "tasks": settings.tasks,
      "inputs": [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.exists(f)],
      "pieces": [[p.path, p.weight, p.offset, p.member] for p in pieces],
      "issues": plan_issues.to_dict(),
  }
  if issues_out is not None:
    issues_out.merge(plan_issues)
  return settings, pieces, stages, plan


def ensure_plan(root: str, plan: dict, progress: bool) -> None:
  """Keeps finished stages only when they were made from the same plan; otherwise starts over."""
  plans.keep_or_reset(root, PLAN_FILE, plan, "the inputs, filter settings, task count or datatrove version "
                      "changed since these stages ran; filtering again", progress)


def filter_corpus(config, files: list[str], issues: Issues, *, progress: bool = True,
                  num_processes: int | None = None):
  """Runs data.filters over `files` (resuming finished stages) and returns (config, files) for tokenization.

  Without filters returns its arguments. Otherwise the returned config reads the kept documents
  (data.source=jsonl from the last stage's output) and `issues` gains the bad input the filter
  pass met. Raises DataError when datatrove is missing or no document is kept."""
  steps = parse_filters(config.data.filters)
  if not steps:
    return config, files
  require_datatrove(config)
  root = filter_root(config.data.data_dir)
  _, pieces, stages, plan = plan_filtering(config, files)
  ensure_plan(root, plan, progress)
  workers = num_processes or _num_processes()
  _log(progress, f"filters {','.join(steps)}: {len(stages)} datatrove stage(s), {num_tasks(config)} task(s) per pass, "
                 f"{min(workers, num_tasks(config))} at a time, in {root}")
  run_stages(stages, pieces, workers=workers, progress=progress)
  summary = write_summary(root, stages, steps, plan)
  issues.merge(Issues.from_dict(summary["bad_input"]))
  _log(progress, format_summary(summary))
  if summary["documents_out"] == 0:
    raise DataError(f"config field 'data.filters' = {config.data.filters!r} removed all {summary['documents_in']} "
                    f"documents; see {os.path.join(root, SUMMARY_FILE)}\n{issues.summary()}")
  out = stages[-1].folder + "/output"
  filtered = copy.deepcopy(config)
  filtered.data.source, filtered.data.paths, filtered.data.text_field = "jsonl", out, "text"
  return filtered, src.source_files("jsonl", out, Issues())


def submit_to_slurm(config, *, partition: str, time_limit: str, cpus_per_task: int = 1, mem_per_cpu_gb: int = 2,
                    env_command: str | None = None, sbatch_args: dict | None = None, with_srun: bool = True,
                    job_name: str = "neon_filter") -> list[str]:
  """Submits every unfinished stage as a datatrove SlurmPipelineExecutor job array, each depending on the one before.

  Same plan, stages and folders as a local run, so completion markers written on the cluster are the
  ones `launch.py --mode=prepare` finds afterwards: it skips the finished stages and tokenizes the
  last stage's output. data.data_dir must be on a file system the nodes share. Returns the job ids."""
  from datatrove.executor.slurm import SlurmPipelineExecutor

  require_datatrove(config)
  issues = Issues()
  files = src.source_files(config.data.source, config.data.paths, issues)
  if not files:
    raise DataError(f"data.source={config.data.source!r}, data.paths={config.data.paths!r}: no input files\n"
                    f"{issues.summary()}")
  root = filter_root(config.data.data_dir)
  _, _, stages, plan = plan_filtering(config, files)
  ensure_plan(root, plan, progress=True)
  executors, previous = [], None
  for i, stage in enumerate(stages, start=1):
    previous = SlurmPipelineExecutor(
        pipeline=stage.pipeline, tasks=stage.tasks, time=time_limit, partition=partition,
        cpus_per_task=cpus_per_task, mem_per_cpu_gb=mem_per_cpu_gb, job_name=f"{job_name}_{i:02d}_{stage.name}",
        env_command=env_command, sbatch_args=sbatch_args, logging_dir=stage.folder, depends=previous,
        slurm_logs_folder=os.path.join(stage.folder, "slurm_logs"), with_srun=with_srun)
    executors.append(previous)
  previous.run()   # launches its dependencies first, in stage order
  return [str(e.job_id) for e in executors]


def _num_processes() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _stage_input_bytes(stage, pieces) -> int:
  from neon_qtg_jax.data.filter_steps import CORPUS
  if stage.reads == CORPUS:
    return sum(p.weight for p in pieces)
  if stage.reads and os.path.isdir(stage.reads):
    return sum(os.path.getsize(os.path.join(stage.reads, f)) for f in os.listdir(stage.reads))
  return 0


def _stage_progress(folder: str) -> int:
  done = 0
  progress_dir = os.path.join(folder, "progress")
  if os.path.isdir(progress_dir):
    for name in os.listdir(progress_dir):
      if not name.endswith(".tmp"):
        try:
          with open(os.path.join(progress_dir, name)) as f:
            done += int(f.read() or 0)
        except (OSError, ValueError):
          pass
  return done


def run_stages(stages, pieces, *, workers: int, progress: bool) -> None:
  """Runs each stage on datatrove's local executor; tasks with completion markers are skipped (resume)."""
  import tqdm
  from neon_qtg_jax.data.filter_steps import QuietLocalExecutor

  for i, stage in enumerate(stages, start=1):
    executor = QuietLocalExecutor(stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
                                  logging_dir=stage.folder)
    if not executor.get_incomplete_ranks():
      continue
    total = _stage_input_bytes(stage, pieces)
    bar = tqdm.tqdm(total=total or None, unit="B", unit_scale=True, desc=f"filter {i}/{len(stages)} {stage.name}",
                    disable=not progress, mininterval=1.0, file=sys.stderr)
    stop = threading.Event()

    def watch():
      while not stop.wait(1.0):
        bar.n = _stage_progress(stage.folder)
        bar.refresh()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    clock, cpu = time.perf_counter(), time.process_time()
    try:
      executor.run()
    except Exception as err:  # noqa: BLE001 - a failed task: name the stage and its logs
      raise DataError(f"filter stage {stage.name} failed ({type(err).__name__}: {err}); task logs in "
                      f"{os.path.join(stage.folder, 'logs')}; rerun to resume") from err
    finally:
      stop.set()
      watcher.join()
      bar.n = _stage_progress(stage.folder)
      bar.close()
    with open(os.path.join(stage.folder, "seconds.json"), "w") as f:
      # this process's CPU: the whole stage's when it ran in-process (one worker), else only its share
      json.dump({"seconds": time.perf_counter() - clock, "main_cpu_s": time.process_time() - cpu,
                 "tasks": stage.tasks, "workers": min(workers, stage.tasks)}, f)


def write_summary(root: str, stages, steps: tuple[str, ...], plan: dict) -> dict[str, Any]:
  """Merges the stages' tallies and bad input into root/summary.json and returns it."""
  from neon_qtg_jax.data.filter_steps import stage_summary

  per_step: dict[str, Any] = {}
  issues = Issues.from_dict(plan["issues"])
  stage_rows = []
  for stage in stages:
    per_step.update(stage_summary(stage))
    issue_dir = os.path.join(stage.folder, "issues")
    if os.path.isdir(issue_dir):
      for name in sorted(os.listdir(issue_dir)):
        if name.endswith(".json"):
          with open(os.path.join(issue_dir, name)) as f:
            issues.merge(Issues.from_dict(json.load(f)))
    seconds_path = os.path.join(stage.folder, "seconds.json")
    timing = {"seconds": None}     # None: finished by an earlier run or on a cluster
    if os.path.exists(seconds_path):
      with open(seconds_path) as f:
        timing = json.load(f)
    stage_rows.append({"name": os.path.basename(stage.folder), "tasks": stage.tasks, **timing})
  ordered = {step: per_step[step] for step in steps if step in per_step}
  first, last = ordered[steps[0]], ordered[steps[-1]]
  summary = {
      "steps": list(steps), "tasks": plan["tasks"], "datatrove": plan["datatrove"],
      "documents_in": first["docs_in"], "documents_out": last["docs_out"],
      "bytes_in": first["bytes_in"], "bytes_out": last["bytes_out"],
      "removed": ordered, "stages": stage_rows, "bad_input": issues.to_dict(),
  }
  with open(os.path.join(root, SUMMARY_FILE + ".tmp"), "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(os.path.join(root, SUMMARY_FILE + ".tmp"), os.path.join(root, SUMMARY_FILE))
  return summary


def load_summary(data_dir: str) -> dict[str, Any] | None:
  """The filter summary of a prepared directory, or None when it was prepared without filters."""
  path = os.path.join(filter_root(data_dir), SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def format_summary(summary: dict[str, Any]) -> str:
  """A table of removals per step and the first examples of each."""
  lines = [f"filters: {summary['documents_in']:,} documents ({summary['bytes_in'] / 1e6:.2f} MB) in, "
           f"{summary['documents_out']:,} ({summary['bytes_out'] / 1e6:.2f} MB) kept",
           f"  {'step':<18} {'docs removed':>12} {'MB removed':>11} {'line MB':>8}  reasons"]
  for step, m in summary["removed"].items():
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(m["reasons"].items(), key=lambda kv: -kv[1])[:4])
    lines.append(f"  {step:<18} {m['docs_removed']:>12,} {m['bytes_removed'] / 1e6:>11.3f} "
                 f"{m['line_bytes_removed'] / 1e6:>8.3f}  {reasons}")
    for ex in m["examples"]:
      lines.append(f"      {ex['origin']}: {ex['text'][:100]!r}")
  return "\n".join(lines)
