"""Runs a study's grid one run after another: train, score the final checkpoint, collect a record.

Each run has its own workdir: STUDY/runs/GROUP/VARIANT/seedN, and STUDY/tune/GROUP/VARIANT/lrX for
the tuning runs of an lr grid. At its first start a run writes `run.json` there (its key and its
whole resolved config: base config, study, group and variant overrides, budget, seed, lr) and
appends one line per attempt to `attempts.jsonl` (the code version of that attempt). A finished
run writes `result.json` (never overwritten). What a workdir holds is reused only when its
`run.json` config equals the config the study file gives now; otherwise it is stale: reported,
never reused, and with rerun_stale moved aside to WORKDIR.staleN and run again. An interrupted
or failed run resumes from its latest checkpoint; each attempt scores into a fresh file
(eval/final_val.json, then final_val.2.json, ...), so a retry never trips over an earlier
attempt's result. The trainer's console output goes to the run's outputs/logs/console.txt so
that the study prints one line per run with the overall ETA.

Several processes may share one study directory: a process holds an exclusive lock on a run
(`.WORKDIR.lock` beside its workdir, fcntl.flock, released by the kernel when the process dies)
while it runs it, and skips a run another process holds, so no run is ever run twice at once.

Code versions: a run records the code of the process that ran it (provenance.code_version, taken
when the study process starts). By default a different code version does not make a run stale
(a study of many CPU hours is not redone for every commit): the report lists the versions and
flags runs whose code differs from the majority. require_same_code makes every run made by other
code than this checkout's (commit and uncommitted changes) stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import time
from typing import Any, Callable

import ml_collections

from neon_qtg_jax import info
from neon_qtg_jax.cli import RunArgs
from neon_qtg_jax.study import provenance, readout
from neon_qtg_jax.training import preemption
from neon_qtg_jax.study.spec import Run, config_json, expected_seconds, resolve_lr, train_flops_per_step

SPEC_FILE = "run.json"
ATTEMPTS_FILE = "attempts.jsonl"
RESULT_FILE = "result.json"


def run_workdir(study_dir: str, run: Run) -> str:
  if run.phase == "tune":
    return os.path.join(study_dir, "tune", run.group, run.variant, f"lr{run.lr:g}")
  return os.path.join(study_dir, "runs", run.group, run.variant, f"seed{run.seed}")


def fresh_path(directory: str, stem: str, suffix: str = ".json") -> str:
  """directory/stem.json, else stem.2.json, stem.3.json, ...: the first name no earlier attempt used."""
  path, n = os.path.join(directory, stem + suffix), 1
  while os.path.exists(path):
    n += 1
    path = os.path.join(directory, f"{stem}.{n}{suffix}")
  return path


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_new_json(path: str, obj: Any) -> None:
  """Writes a file that must not exist yet (FileExistsError otherwise): results are never overwritten."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "x", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
  return out


def config_difference(recorded: dict[str, Any], wanted: dict[str, Any], limit: int = 4,
                      defaults: dict[str, Any] | None = None) -> str:
  """The fields where two run configs differ, as 'field: recorded -> wanted; ...' ('' when equal).

  defaults (flat, e.g. the study's base config): a field the recorded config lacks counts as equal when
  the wanted value is its default (a field added to the config since, at the value that keeps the old behaviour).
  """
  a, b = _flat(recorded), _flat(wanted)
  absent = object()
  added = {k for k in b.keys() - a.keys() if defaults is not None and defaults.get(k, absent) == b[k]}
  fields = [k for k in sorted((a.keys() | b.keys()) - added) if a.get(k, "(absent)") != b.get(k, "(absent)")]
  text = "; ".join(f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in fields[:limit])
  return text + (f"; and {len(fields) - limit} more" if len(fields) > limit else "")


def attempt_codes(workdir: str) -> list[dict[str, str]]:
  """The code version of every attempt at the run in workdir, in order."""
  path = os.path.join(workdir, ATTEMPTS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["code"] for line in f if line.strip()]


def stale_reason(workdir: str, run: Run, code: dict[str, str] | None = None, require_same_code: bool = False) -> str:
  """Why what workdir holds was made under other settings than `run` ('' when it belongs to it or is empty)."""
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    return ""
  spec_path = os.path.join(workdir, SPEC_FILE)
  if not os.path.exists(spec_path):
    return f"it has no {SPEC_FILE} (made before runs recorded their full config)"
  difference = config_difference(_read_json(spec_path)["config"], config_json(run.config))
  if difference:
    return f"made with another config ({difference})"
  if require_same_code and code is not None:
    other = sorted({provenance.version_label(c) for c in attempt_codes(workdir)} - {provenance.version_label(code)})
    if other:
      return f"made by code {', '.join(other)}, this checkout is {provenance.version_label(code)} (--require_same_code)"
  return ""


def prepared_fingerprint(data_dir: str) -> dict[str, Any] | None:
  """The fingerprint of the data prepared in data_dir (Manifest.fingerprint); None where none is prepared."""
  from neon_qtg_jax.data.manifest import Manifest  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.data.sources import DataError  # pylint: disable=import-outside-toplevel
  try:
    return Manifest.load(data_dir).fingerprint()
  except DataError:
    return None


@dataclasses.dataclass(frozen=True)
class Published:
  """The finished runs of a published study.json (docs/results/study.json), reused where a study directory
  has no workdir for them: a study continues from its published record after its run directories are gone.
  A record is reused only when its config equals the run's now, `defaults` (the study's base config, flat)
  standing in for the fields added to the config since it was made, and when the data it was trained on is
  the data prepared here (its `data` fingerprint against data.data_dir's manifest). A record that cannot be
  checked (made before records had a fingerprint, or its data not prepared here) is reused and marked
  `data_unchecked` with the reason, which the report lists."""
  path: str
  records: dict[str, dict[str, Any]]
  defaults: dict[str, Any]
  prepared: dict[str, dict[str, Any] | None] = dataclasses.field(default_factory=dict, compare=False)  # by data_dir

  @classmethod
  def load(cls, path: str, base: ml_collections.ConfigDict) -> "Published":
    study_json = _read_json(path)
    return cls(path, {r["key"]: r for r in study_json["runs"] + study_json["tuning_runs"]}, _flat(config_json(base)))

  def record(self, run: Run) -> tuple[dict[str, Any] | None, str]:
    """(the published record of `run` marked with `published_in`, "") or (None, why it cannot be reused)."""
    record = self.records.get(run.key)
    if record is None:
      return None, ""
    difference = config_difference(record["config"], config_json(run.config), defaults=self.defaults)
    if difference:
      return None, f"the record in {self.path} was made with another config ({difference})"
    data_dir = run.config.data.data_dir
    if data_dir not in self.prepared:
      self.prepared[data_dir] = prepared_fingerprint(data_dir)
    unchecked = ""
    if not record.get("data"):
      unchecked = "the record has no data fingerprint (made before records had one): its data is not compared"
    elif self.prepared[data_dir] is None:
      unchecked = (f"{data_dir} is not prepared here, so the record's data is not compared (launch.py "
                   "--mode=prepare with the run's config prepares it)")
    else:
      difference = config_difference(record["data"], self.prepared[data_dir])
      if difference:
        return None, f"the record in {self.path} was trained on other data than {data_dir} holds ({difference})"
    record = {k: v for k, v in record.items() if k != "data_unchecked"}  # as checked here, not where published
    return record | {"published_in": self.path} | ({"data_unchecked": unchecked} if unchecked else {}), ""


def move_aside(workdir: str) -> str:
  """Renames workdir to the first free WORKDIR.staleN; returns the new path (nothing is deleted)."""
  n = 1
  while os.path.exists(f"{workdir}.stale{n}"):
    n += 1
  os.rename(workdir, f"{workdir}.stale{n}")
  return f"{workdir}.stale{n}"


@contextlib.contextmanager
def run_lock(workdir: str):
  """Yields True while this process holds the run's lock, False when another process holds it."""
  path = os.path.join(os.path.dirname(workdir), f".{os.path.basename(workdir)}.lock")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _start_attempt(workdir: str, run: Run, code: dict[str, str]) -> None:
  """Writes run.json at the first start (the run's identity) and one attempts.jsonl line per start."""
  os.makedirs(os.path.join(workdir, "outputs", "logs"), exist_ok=True)
  spec_path = os.path.join(workdir, SPEC_FILE)
  if not os.path.exists(spec_path):
    _write_new_json(spec_path, {"key": run.key, "phase": run.phase, "config": config_json(run.config)})
  with open(os.path.join(workdir, ATTEMPTS_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps({"code": code, "started": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")


def _val_curve(metrics_path: str, tokens_per_step: int, flops_per_step: float) -> list[dict[str, float]]:
  """Validation cross-entropy (the fixed eval batches) at every evaluation of the run."""
  from neon_qtg_jax.training.metric_writers import read_jsonl  # pylint: disable=import-outside-toplevel
  by_step = {r["step"]: r["val/ce"] for r in read_jsonl(metrics_path) if "val/ce" in r}
  return [{"step": s, "tokens": s * tokens_per_step, "flops": s * flops_per_step, "val_ce": by_step[s]}
          for s in sorted(by_step)]


def _training_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict | None:
  """The config to train with. A wall-time run that resumes gets the minutes its earlier attempts left
  (from the checkpoint's train seconds); None when none are left."""
  from neon_qtg_jax.checkpoint import checkpointer  # pylint: disable=import-outside-toplevel
  minutes = config.training.max_train_minutes
  if minutes <= 0 or not os.path.isdir(checkpointer.checkpoint_dir(workdir)):
    return config
  try:
    used = checkpointer.load_meta(workdir, "latest")["train_seconds"] / 60
  except FileNotFoundError:
    return config
  if used >= minutes:
    return None
  left = ml_collections.ConfigDict(config.to_dict())
  left.training.max_train_minutes = minutes - used
  return left


class Interrupted(RuntimeError):
  """A run that SIGTERM / SIGINT stopped: it resumes from its checkpoint on the next call, never scored now."""


def train_and_score(run: Run, workdir: str, code: dict[str, str],
                    interrupted: Callable[[], bool] = lambda: False) -> dict[str, Any]:
  """Trains (or resumes) the run and scores its final checkpoint on its split; the record.

  interrupted() tells whether a stop signal arrived during training; then the run raises Interrupted
  instead of being scored (a wall-time run would otherwise count as finished at the step it reached).

  Final runs are scored on the whole validation split, tuning runs on the whole tuning split. A
  tuning run whose training diverged (the trainer stopped on non-finite losses) is recorded as
  diverged, never chosen; a final run that diverged raises.
  """
  from neon_qtg_jax.evaluation import perplexity  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.inference.restore import load_model  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.checkpoint import checkpointer  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.parallel import ShardingConfig  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.training import spike, trainer  # pylint: disable=import-outside-toplevel
  config = run.config
  _start_attempt(workdir, run, code)
  console = os.path.join(workdir, "outputs", "logs", "console.txt")
  split = "tune" if run.phase == "tune" else "val"
  started = time.perf_counter()
  diverged = False
  scores, eval_path, scalars, entropy, entropy_error = None, None, None, None, ""
  with (open(console, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(out)):
    train_config = _training_config(config, workdir)
    if train_config is not None:
      exit_code = trainer.run(train_config, RunArgs(workdir=workdir))
      if interrupted():
        raise Interrupted(f"{run.key}: stopped by a signal at step {checkpointer.load_meta(workdir, 'latest')['step']}; "
                          "the next call resumes it from that checkpoint")
      diverged = exit_code == spike.EXIT_UNSTABLE and run.phase == "tune"
      if exit_code and not diverged:
        raise RuntimeError(f"{run.key}: training exited with code {exit_code} (log: {console})")
    meta = checkpointer.load_meta(workdir, "latest")
    if not diverged:
      if meta["step"] < config.training.total_steps and run.budget["kind"] != "wall_time":
        raise RuntimeError(f"{run.key}: stopped at step {meta['step']} of {config.training.total_steps} "
                           f"(log: {console})")
      eval_path = fresh_path(os.path.join(workdir, "eval"), f"final_{split}")
      exit_code = perplexity.run(config, RunArgs(workdir=workdir, checkpoint="latest", output=eval_path,
                                                 eval_split=split))
      if exit_code:
        raise RuntimeError(f"{run.key}: --mode=eval exited with code {exit_code} (log: {console})")
      final = _read_json(eval_path)
      scores = {"loss": final["loss"], "perplexity": final["perplexity"], "bits_per_byte": final["bits_per_byte"],
                "tokens": final["tokens"], "checkpoint_step": final["checkpoint_step"]}
      if run.phase == "final":
        restored = load_model(workdir, "latest", config, sharding=ShardingConfig.from_config(config.parallel))
        scalars = readout.attention_scalars(restored.model)
        entropy, entropy_error = readout.attention_entropy(restored.model, restored.run_config)
  summary = info.summarize(config)
  t = config.training
  tokens_per_step = summary["tokens_per_step"]
  flops_per_step = train_flops_per_step(config)
  curve = _val_curve(os.path.join(workdir, "outputs", "logs", "metrics.jsonl"), tokens_per_step, flops_per_step)
  best = min(curve, key=lambda p: p["val_ce"]) if curve else None
  steps = int(meta["step"])
  breakdown = summary["params_breakdown"]
  record = {
      "key": run.key, "phase": run.phase, "group": run.group, "variant": run.variant, "label": run.label,
      "seed": run.seed, "tier": run.tier, "lr": run.lr, "lr_grid": list(run.lr_grid),
      "lr_group": run.lr_group or run.group, "overrides": run.overrides,
      "budget": run.budget, "workdir": os.path.abspath(workdir), "config": config_json(config),
      "code": code, "code_attempts": attempt_codes(workdir),
      "params": summary["params"],
      "non_embedding_params": sum(v for k, v in breakdown.items() if k.startswith("blocks.")),
      "train_flops_per_token": summary["flops_per_token"]["train"],
      "tokens_per_step": tokens_per_step, "steps": steps, "planned_steps": t.total_steps,
      "stopped_by_clock": run.budget["kind"] == "wall_time" and steps < t.total_steps,
      "tokens": steps * tokens_per_step, "train_flops": steps * flops_per_step,
      "train_seconds": float(meta["train_seconds"]), "run_seconds": time.perf_counter() - started,
      "data": prepared_fingerprint(config.data.data_dir),
      "eval_split": split, "eval_file": os.path.relpath(eval_path, workdir) if eval_path else None,
      "best_val_ce": best["val_ce"] if best else None, "best_val_step": best["step"] if best else None,
      "best_val_perplexity": math.exp(best["val_ce"]) if best else None,
      "curve": curve,
  }
  if run.phase == "tune":
    record["tune"] = scores if not diverged else {"bits_per_byte": None, "diverged": True}
  else:
    record |= {"final": scores, "attention_scalars": scalars, "attention_entropy": entropy,
               "attention_entropy_error": entropy_error}
  return record


def choose_lr(grid: tuple[float, ...], tuning: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The grid value whose tuning run has the lowest tuning bits/byte (the first on a tie; diverged
  runs never win), with every value's result; None until every value has a finished tuning run."""
  by_lr = {r["lr"]: r for r in tuning}
  if any(lr not in by_lr for lr in grid):
    return None
  bits = [by_lr[lr]["tune"]["bits_per_byte"] for lr in grid]
  finite = [(b, i) for i, b in enumerate(bits) if b is not None and math.isfinite(b)]
  return {"grid": list(grid), "tune_bits_per_byte": bits, "steps": [by_lr[lr]["steps"] for lr in grid],
          "stopped_by_clock": [by_lr[lr]["stopped_by_clock"] for lr in grid],
          "seed": by_lr[grid[0]]["seed"], "budget": by_lr[grid[0]]["budget"],
          "chosen": grid[min(finite)[1]] if finite else None}


@dataclasses.dataclass
class Outcome:
  """What a study directory holds for the runs of a study file."""
  records: list[dict[str, Any]] = dataclasses.field(default_factory=list)   # finished final runs
  tuning: list[dict[str, Any]] = dataclasses.field(default_factory=list)    # finished tuning runs
  lr_choices: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # "group/variant" ->
  failures: list[str] = dataclasses.field(default_factory=list)  # failed in this call, or cannot run
  stale: list[str] = dataclasses.field(default_factory=list)     # made under other settings: not reused
  unchecked: list[str] = dataclasses.field(default_factory=list)  # published records reused, data not compared
  pending: list[str] = dataclasses.field(default_factory=list)   # not run yet (report only, time limit)
  ran: int = 0               # runs this call trained and scored
  out_of_time: bool = False  # stop_after_seconds left runs unstarted
  stopped_by: str = ""       # the signal that stopped this call


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _resolve(run: Run, outcome: Outcome, blocked: set[str]) -> tuple[Run | None, str]:
  """A final run with its chosen lr, or (None, why not)."""
  name = f"{run.lr_group or run.group}/{run.variant}"
  if name in outcome.lr_choices:
    choice = outcome.lr_choices[name]
  else:
    choice = choose_lr(run.lr_grid, [r for r in outcome.tuning if f"{r['group']}/{r['variant']}" == name])
    if choice is None:
      return None, ("its lr tuning did not finish (a tuning run failed or is stale)" if name in blocked
                    else "waiting for its lr tuning")
    outcome.lr_choices[name] = choice
  if choice["chosen"] is None:
    return None, f"every learning rate of its grid {choice['grid']} diverged in tuning"
  return resolve_lr(run, choice["chosen"]), ""


def run_all(runs: list[Run], study_dir: str, *, execute: bool = True, rerun_stale: bool = False,
            require_same_code: bool = False, stop_after_seconds: float = 0.0, code: dict[str, str] | None = None,
            read_only: frozenset[str] = frozenset(), published: Published | None = None,
            print_fn: Callable[[str], None] = print) -> Outcome:
  """Runs every missing run in order (execute=False: none) and collects what the study directory holds.

  published: a run without a workdir takes its record from there when that record's config is the run's and
  its data is the data prepared here (Published.record).

  Runs whose key is in read_only are collected when finished, never run or moved aside here: the
  tuning runs another process runs, read so that this one's runs can take their learning rates.

  The ETA is this process's alone: the measured seconds per training FLOP of the runs it finished
  in this call (compilation and scoring included) times the FLOPs of the runs without a result
  after the current one (a wall-time run counts its minutes); other processes sharing the study
  directory shorten it. With
  stop_after_seconds > 0 no new run starts after that many seconds (the rest stays pending).
  """
  code = code or provenance.code_version()
  outcome = Outcome()
  blocked: set[str] = set()   # group/variant whose tuning cannot complete in this call
  mine = [r for r in runs if r.key not in read_only]

  def has_result(r: Run) -> bool:  # a published record counts (its config is checked when the run comes up)
    return (os.path.exists(os.path.join(run_workdir(study_dir, r), RESULT_FILE))
            or (published is not None and r.key in published.records))

  finished = sum(map(has_result, mine))
  tuning_runs = sum(r.phase == "tune" for r in mine)
  if execute:
    print_fn(f"study: {len(mine)} runs ({tuning_runs} lr tuning runs), {finished} with a result, "
             f"{len(mine) - finished} to run; code {code['describe']}"
             + (f"; {len(read_only)} tuning runs of other groups or variants read, not run" if read_only else ""))
  done_flops = done_seconds = 0.0
  started = time.perf_counter()
  # A stop signal during a run's training reaches this flag too (PreemptionFlag passes it on): the run
  # saves its checkpoint and no further run starts.
  with preemption.PreemptionFlag() as stop:
    for position, run in enumerate(runs):
      if stop.requested:
        outcome.stopped_by = stop.signal_name
        outcome.pending.append(f"{run.key}: not run: the study was stopped by {stop.signal_name}")
        continue
      name = f"{run.group}/{run.variant}"
      if run.pending_lr:
        resolved, why = _resolve(run, outcome, blocked)
        if resolved is None:
          waiting = name not in blocked and "diverged" not in why
          (outcome.pending if waiting else outcome.failures).append(f"{run.key}: not run: {why}")
          continue
        run = resolved
      workdir = run_workdir(study_dir, run)
      with run_lock(workdir) if execute and run.key not in read_only else contextlib.nullcontext(True) as held:
        if not held:
          outcome.pending.append(f"{run.key}: being run by another process")
          print_fn(f"[{position + 1}/{len(runs)}] {run.key}: being run by another process; skipped")
          continue
        reason = stale_reason(workdir, run, code, require_same_code)
        if reason and execute and rerun_stale and run.key not in read_only:
          print_fn(f"[{run.key}] {workdir}: {reason}; moved aside to {move_aside(workdir)}, running it again")
        elif reason:
          outcome.stale.append(f"{run.key}: {workdir} was {reason}; not reused (--rerun_stale moves it aside and runs "
                               "it again, or use another --out)")
          if execute:
            print_fn(f"[{run.key}] {outcome.stale[-1]}")
          if run.phase == "tune":
            blocked.add(name)
          continue
        result_path = os.path.join(workdir, RESULT_FILE)
        if os.path.exists(result_path):
          (outcome.tuning if run.phase == "tune" else outcome.records).append(_read_json(result_path))
          continue
        if published is not None and not os.path.isdir(workdir):
          record, why = published.record(run)
          if record is not None:
            (outcome.tuning if run.phase == "tune" else outcome.records).append(record)
            if record.get("data_unchecked"):
              outcome.unchecked.append(f"{run.key}: {record['data_unchecked']}")
            continue
          if why:
            print_fn(f"[{run.key}] not reused: {why}")
        if run.key in read_only:
          outcome.pending.append(f"{run.key}: not run yet (not one of the runs this call selects)")
          continue
        if not execute or (stop_after_seconds and time.perf_counter() - started > stop_after_seconds):
          outcome.out_of_time = execute
          outcome.pending.append(f"{run.key}: not run yet")
          continue
        run_start = time.perf_counter()
        try:
          record = train_and_score(run, workdir, code, lambda: stop.requested)
        except Interrupted as err:
          outcome.stopped_by = stop.signal_name
          outcome.pending.append(str(err))
          print_fn(f"[{position + 1}/{len(runs)}] {err}")
          continue
        except Exception as err:  # pylint: disable=broad-except
          outcome.failures.append(f"{run.key}: {type(err).__name__}: {err}")
          print_fn(f"[{position + 1}/{len(runs)}] {run.key} FAILED: {err}")
          if run.phase == "tune":
            blocked.add(name)
          continue
        _write_new_json(result_path, record)
        outcome.ran += 1
      (outcome.tuning if run.phase == "tune" else outcome.records).append(record)
      elapsed = time.perf_counter() - run_start
      if run.budget["kind"] != "wall_time":  # a wall-time run's seconds are its minutes, not its FLOPs
        done_flops += record["train_flops"]
        done_seconds += elapsed
      remaining = [r for r in runs[position + 1:] if r.key not in read_only and not has_result(r)]
      measured = done_flops > 0 or all(r.budget["kind"] == "wall_time" for r in remaining)
      eta = (f"ETA {_duration(sum(expected_seconds(r, done_seconds / max(done_flops, 1.0)) for r in remaining))}"
             if measured else "ETA not known yet")
      scores = record.get("final") or record["tune"]
      bits = "diverged" if scores.get("diverged") else f"{scores['bits_per_byte']:.4f}"
      print_fn(f"[{position + 1}/{len(runs)}] {run.key}: {record['steps']} steps, {record['eval_split']} bits/byte "
               f"{bits}, {_duration(elapsed)} | {len(remaining)} left, {eta} for one process")
  return outcome
