"""--mode=train: data on first use, the training loop, evaluation, samples, checkpoints and resume.

Outputs under the workdir: checkpoints/, tensorboard/, outputs/logs/{training.log,metrics.jsonl},
outputs/samples/step_XXXXXXX.txt and outputs/plots/loss.png.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import logging as absl_logging
import ml_collections
import numpy as np
import psutil
from flax import nnx

from neon_qtg_jax import info, parallel
from neon_qtg_jax.parallel import decisions, inputs
from neon_qtg_jax.checkpoint import checkpointer as checkpointing
from neon_qtg_jax.checkpoint import resume, storage, uploader as backup_uploader
from neon_qtg_jax.training import plots
from neon_qtg_jax.training import train_step as ts
from neon_qtg_jax.training.metric_writers import create_run_writer, metric_writers, read_jsonl
from neon_qtg_jax.training.preemption import PreemptionFlag

log = logging.getLogger("neon_qtg_jax")

EXIT_OK, EXIT_NONFINITE = 0, 1


def setup_logging(workdir: str) -> str:
  """Console (stdout) and {workdir}/outputs/logs/training.log for every neon_qtg_jax logger; returns the log path.

  Only process 0 writes the file; the other processes print warnings and errors to stderr.
  """
  path = os.path.join(workdir, "outputs", "logs", "training.log")
  writer = decisions.is_writer()
  if writer:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  prefix = "" if jax.process_count() == 1 else f"[process {jax.process_index()}] "
  formatter = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S")
  for handler in list(log.handlers):
    log.removeHandler(handler)
    handler.close()
  handlers = ((logging.StreamHandler(sys.stdout), logging.FileHandler(path, encoding="utf-8")) if writer
              else (logging.StreamHandler(sys.stderr),))
  for handler in handlers:
    handler.setFormatter(formatter)
    log.addHandler(handler)
  log.setLevel(logging.INFO if writer else logging.WARNING)
  log.propagate = False
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax narrates every save at INFO through absl
  return path


@dataclasses.dataclass
class RunData:
  train_iter: Any
  eval_batches: list[dict[str, jax.Array]]
  tokenizer: Any
  unigram_perplexity: float


def load_data(config: ml_collections.ConfigDict, sharding: parallel.ShardingConfig) -> RunData:
  """Prepares the dataset when its shards are missing, then opens the training and validation data.

  The training iterator yields this process's rows of each global batch (parallel.inputs).
  """
  from neon_qtg_jax.data import loader, prepare  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  prepare.prepare_dataset(config, progress=True)
  tokenizer = Tokenizer.load(config.data.data_dir)
  unigram = loader.unigram_perplexity(loader.split_tokens(config, "train"), loader.split_tokens(config, "val"),
                                      config.model.vocab_size)
  batches = loader.eval_batches(config, split="val", num_batches=config.training.eval_batches,
                                batch_size=config.training.batch_size)
  index, count = inputs.process_rows(sharding, config.training.batch_size * config.training.grad_accum_steps)
  return RunData(loader.make_train_iterator(config, shard_index=index, shard_count=count),
                 [inputs.replicated_batch(b, sharding) for b in batches], tokenizer, unigram)


def iterator_args(train_iter: Any, save: bool) -> Any:
  from neon_qtg_jax.data import loader  # pylint: disable=import-outside-toplevel
  return loader.iterator_save_args(train_iter) if save else loader.iterator_restore_args(train_iter)


@dataclasses.dataclass
class Progress:
  """Host-side bookkeeping that goes into each checkpoint's meta item."""
  best_val_loss: float = math.inf
  train_seconds: float = 0.0

  def meta(self, state: ts.TrainState) -> dict[str, Any]:
    counters = jax.device_get({"step": state.step, "rng": state.rng, "nonfinite_total": state.nonfinite_total,
                               "nonfinite_streak": state.nonfinite_streak, "nonfinite_peak": state.nonfinite_peak})
    return {"step": int(counters["step"]), "rng": np.asarray(counters["rng"]).tolist(),
            "nonfinite_total": int(counters["nonfinite_total"]), "nonfinite_streak": int(counters["nonfinite_streak"]),
            "nonfinite_peak": int(counters["nonfinite_peak"]), "best_val_loss": self.best_val_loss,
            "train_seconds": self.train_seconds}


def plan_resume(config: ml_collections.ConfigDict, args: Any, checkpointer: checkpointing.Checkpointer
                ) -> resume.ResumePlan:
  """The resume plan of this run; restores the backed-up tokenizer first when the plan may use the backup."""
  plan = resume.plan_resume(args.resume_from, checkpointer.directory, config.training.backup_url,
                            checkpointer.steps())
  if any(c.source == resume.BACKUP for c in plan.candidates):
    storage.fetch_data_files(config.training.backup_url, config.data.data_dir)
  return plan


def restore_or_init(config: ml_collections.ConfigDict, args: Any, checkpointer: checkpointing.Checkpointer,
                    target: ts.TrainState, train_iter: Any, sharding: parallel.ShardingConfig,
                    init: Callable[[], ts.TrainState], plan: resume.ResumePlan | None = None
                    ) -> tuple[ts.TrainState, Progress]:
  """Resumes from the plan's first checkpoint that restores (resume.restore_plan); else returns `init()`.

  `target` is the abstract, sharded state (ShapeDtypeStructs): Orbax reads every array straight
  into its shards, so a resume never holds a freshly initialised state beside the restored one.
  """
  plan = plan or plan_resume(config, args, checkpointer)
  if plan.fresh:
    log.info("no checkpoint in %s: starting from step 0", checkpointer.directory)
    return init(), Progress()

  def data_args(step_dir: str) -> Any:
    return iterator_args(train_iter, save=False) if train_iter is not None and loader_has_state(step_dir) else None

  found = resume.restore_plan(plan, checkpointer, targets={"params": target.params, "opt_state": target.opt_state},
                              data_args=data_args, config=config)
  if found is None:
    return init(), Progress()
  meta = found.items["meta"]
  replicated = sharding.replicated()

  def scalar(name: str) -> jax.Array:
    return jax.device_put(jnp.asarray(meta[name], jnp.int32), replicated)

  state = target.replace(step=scalar("step"), params=found.items["params"], opt_state=found.items["opt_state"],
                        rng=jax.device_put(jnp.asarray(meta["rng"], jnp.uint32), replicated),
                        nonfinite_streak=scalar("nonfinite_streak"), nonfinite_peak=scalar("nonfinite_peak"),
                        nonfinite_total=scalar("nonfinite_total"))
  if train_iter is not None and "data" not in found.items:
    from neon_qtg_jax.data import loader  # pylint: disable=import-outside-toplevel
    global_rows = config.training.batch_size * config.training.grad_accum_steps
    _, count = inputs.process_rows(sharding, global_rows)
    loader.skip_to_step(train_iter, int(meta["step"]), global_rows // count)
    log.info("data position set from step %d: the checkpoint was written under another process layout",
             int(meta["step"]))
  return state, Progress(best_val_loss=meta["best_val_loss"], train_seconds=meta["train_seconds"])


def loader_has_state(step_dir: str) -> bool:
  from neon_qtg_jax.data import loader  # pylint: disable=import-outside-toplevel
  return loader.has_iterator_state(step_dir, jax.process_index(), jax.process_count())


def evaluate(eval_step: Any, params: nnx.State, batches: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Mean of every loss term over the fixed validation batches (all hold full windows), and the perplexity."""
  per_batch = jax.device_get([eval_step(params, b) for b in batches])
  out = {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}
  out["perplexity"] = math.exp(out["ce"])
  return out


def write_samples(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: nnx.State, tokenizer: Any,
                  workdir: str, step: int, sharding: parallel.ShardingConfig) -> str:
  """Continues config.sampling.prompts with the configured sampling; writes outputs/samples/step_XXXXXXX.txt."""
  from neon_qtg_jax.inference.sampling import generate  # pylint: disable=import-outside-toplevel
  s = config.sampling
  prompts = list(s.prompts)
  prompt_ids = [tokenizer.encode(p) or [tokenizer.bos_id] for p in prompts]
  max_new = min(s.max_new_tokens, config.model.max_seq_len - max(len(p) for p in prompt_ids))
  outputs = generate(nnx.merge(graphdef, params), prompt_ids, sampling_cfg=s, max_new_tokens=max_new,
                     eos_id=tokenizer.eos_id, seed=s.seed, valid_vocab=tokenizer.vocab_size, sharding=sharding)
  text = "\n\n".join(f"=== prompt {i}: {p!r}\n{p}{tokenizer.decode(o)}" for i, (p, o) in enumerate(zip(prompts, outputs)))
  path = os.path.join(workdir, "outputs", "samples", f"step_{step:07d}.txt")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"step {step}, temperature {s.temperature}, top_k {s.top_k}, top_p {s.top_p}, seed {s.seed}\n\n{text}\n")
  return text


def device_memory_gib() -> dict[str, float]:
  """Device memory in use and its peak (GiB) where the backend reports it; else the host process RSS."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "bytes_in_use" in stats:
    return {"memory/device_gib": stats["bytes_in_use"] / 2**30,
            "memory/device_peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}
  return {"memory/host_rss_gib": psutil.Process().memory_info().rss / 2**30}


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _rate_text(scalars: dict[str, float], steps_left: int) -> str:
  if "perf/steps_per_s" not in scalars:
    return ""
  mfu = f" | MFU {scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else ""
  return (f" | {scalars['perf/steps_per_s']:.2f} steps/s | {scalars['perf/tokens_per_s']:.0f} tok/s{mfu}"
          f" | ETA {_duration(steps_left / scalars['perf/steps_per_s'])}")


class WindowStats:
  """Per-step metrics (still on device) and host timings since the last log line."""

  def __init__(self):
    self.reset(time.perf_counter())

  def reset(self, now: float) -> None:
    self.metrics: list[dict[str, jax.Array]] = []
    self.data_wait = 0.0
    self.started = now
    self.untimed = 0  # steps at the start of the window that the timings leave out (compilation)

  def summary(self, config: ml_collections.ConfigDict, peak: float | None) -> dict[str, float]:
    """Syncs with the device once and returns the window's scalars for the writers."""
    fetched = jax.device_get(self.metrics)
    elapsed = time.perf_counter() - self.started
    steps = len(fetched) - self.untimed
    out = {f"train/{k}": float(np.mean([m[k] for m in fetched]))
           for k in ("loss", "ce", "topo", "geo", "quantum", "grad_norm")}
    out["train/perplexity"] = math.exp(out["train/ce"])
    out["train/param_norm"] = float(fetched[-1]["param_norm"])
    out["train/lr"] = float(fetched[-1]["lr"])
    out["train/nonfinite_steps"] = float(sum(1 - float(m["finite"]) for m in fetched))
    out.update(device_memory_gib())
    if steps == 0:  # only the compiling first step: no rates yet
      return out
    tokens_per_s = steps * ts.tokens_per_step(config) / elapsed
    out.update({"perf/step_time_s": elapsed / steps, "perf/steps_per_s": steps / elapsed,
                "perf/tokens_per_s": tokens_per_s, "perf/data_wait_s": self.data_wait / steps})
    if peak:
      out["perf/mfu"] = info.flops_per_token(config)["train"] * tokens_per_s / (peak * jax.device_count())
    return out


def run(config: ml_collections.ConfigDict, args: Any) -> int:
  workdir = os.path.abspath(args.workdir)
  sharding = parallel.ShardingConfig.from_config(config.parallel)
  inputs.check_batch(config, sharding)  # a ConfigError before any work
  setup_logging(workdir)
  t = config.training
  checkpointer = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir), keep=t.keep_checkpoints,
                                            on_save_error=t.on_save_error)
  plan = plan_resume(config, args, checkpointer)
  log.info("workdir %s; devices: %d x %s; mesh %s", workdir, jax.device_count(), jax.devices()[0].device_kind,
           parallel.describe(sharding.mesh))

  data = load_data(config, sharding)
  log.info("data ready: %d validation batches; unigram perplexity of the validation split: %.2f",
           len(data.eval_batches), data.unigram_perplexity)

  graphdef = ts.model_graphdef(config)
  state, progress = restore_or_init(config, args, checkpointer, ts.sharded_abstract_state(config, sharding),
                                    data.train_iter, sharding,
                                    lambda: ts.create_train_state(config, jax.random.PRNGKey(config.seed), sharding)[1],
                                    plan)
  start_step = int(jax.device_get(state.step))
  uploader = (backup_uploader.start_uploader(config, workdir, start_step) if decisions.is_writer()
              else backup_uploader.NoBackup())

  train_step = ts.make_train_step(config, graphdef, sharding)
  eval_step = ts.make_eval_step(config, graphdef, sharding)
  writer = create_run_writer(workdir) if decisions.is_writer() else metric_writers.MultiWriter([])
  plot_loss_curves = plots.plot_loss_curves if decisions.is_writer() else lambda *a, **k: None
  global_rows = t.batch_size * t.grad_accum_steps
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flat(config).items()})
  peak = info.peak_flops(jax.devices()[0].device_kind, config.model.dtype)
  plot_path = os.path.join(workdir, "outputs", "plots", "loss.png")
  metrics_path = os.path.join(workdir, "outputs", "logs", "metrics.jsonl")
  log.info("training steps %d..%d of %d; %d tokens per step; %s parameters", start_step, t.total_steps,
           t.total_steps, ts.tokens_per_step(config), f"{sum(x.size for x in jax.tree.leaves(state.params)):,}")

  def save(step: int, val_loss: float | None = None) -> None:
    checkpointer.save(step, params=state.params, opt_state=state.opt_state, meta=progress.meta(state),
                      config=config, data_args=iterator_args(data.train_iter, save=True), val_loss=val_loss)
    log.info("checkpoint %d saving (asynchronous) to %s", step, checkpointer.directory)

  exit_code, stop_reason = EXIT_OK, "finished"
  window = WindowStats()
  last_save_time = run_start = time.perf_counter()
  last_saved_step = start_step
  last_eval: tuple[int, float] | None = None
  with PreemptionFlag() as preemption:
    step = start_step
    while step < t.total_steps:
      fetch_start = time.perf_counter()
      batch = inputs.global_batch(next(data.train_iter), sharding, global_rows)
      window.data_wait += time.perf_counter() - fetch_start
      state, metrics = train_step(state, batch)
      window.metrics.append(metrics)
      step += 1
      if step == start_step + 1:  # the first step compiles: keep it out of the rates and the ETA
        jax.block_until_ready(metrics)
        log.info("first step (compilation included) took %.1f s", time.perf_counter() - window.started)
        window.started, window.untimed, window.data_wait = time.perf_counter(), 1, 0.0
      # Every process stops and saves at the same step (decisions.agree). With several processes an
      # agreement is an all-gather that blocks the host, so it is taken at log steps only, not every step.
      agreed = {"preempted": False, "out_of_time": False, "save_interval": False}
      if step % t.log_steps == 0 or step == t.total_steps:
        agreed = decisions.agree({
            "preempted": preemption.requested,
            "out_of_time": t.max_train_minutes > 0 and time.perf_counter() - run_start >= 60 * t.max_train_minutes,
            "save_interval": time.perf_counter() - last_save_time >= 60 * t.save_interval_minutes})
      out_of_time = agreed["out_of_time"]
      last = step == t.total_steps or out_of_time  # evaluate, sample and save before stopping

      if step % t.log_steps == 0 or last:
        checkpointer.check()  # a save that failed in the background (disk full) is reported here
        scalars = window.summary(config, peak) | uploader.scalars()
        now = time.perf_counter()
        progress.train_seconds += now - window.started
        window.reset(now)
        writer.write_scalars(step, scalars)
        log.info("step %d/%d | loss %.4f | ce %.4f | ppl %.2f | lr %.2e | gnorm %.3f%s", step, t.total_steps,
                 scalars["train/loss"], scalars["train/ce"], scalars["train/perplexity"], scalars["train/lr"],
                 scalars["train/grad_norm"], _rate_text(scalars, t.total_steps - step))
        counters = jax.device_get({"peak": state.nonfinite_peak, "total": state.nonfinite_total})
        if scalars["train/nonfinite_steps"]:
          log.warning("%d non-finite step(s) skipped since the previous log line (parameters and optimizer "
                      "state kept); %d in total", scalars["train/nonfinite_steps"], counters["total"])
        if counters["peak"] >= t.max_consecutive_nonfinite:
          log.error("stopping: %d consecutive steps had a non-finite loss or gradient "
                    "(training.max_consecutive_nonfinite=%d); the last good checkpoint is step %s in %s",
                    counters["peak"], t.max_consecutive_nonfinite, checkpointer.steps()[-1] if checkpointer.steps()
                    else "none", checkpointer.directory)
          exit_code, stop_reason = EXIT_NONFINITE, "non-finite"
          break

      val_loss = None
      if step % t.eval_steps == 0 or last:
        scores = evaluate(eval_step, state.params, data.eval_batches)
        val_loss = scores["loss"]
        improved = val_loss < progress.best_val_loss
        progress.best_val_loss = min(progress.best_val_loss, val_loss)
        writer.write_scalars(step, {f"val/{k}": v for k, v in scores.items()} | {"val/unigram_perplexity":
                                                                                 data.unigram_perplexity})
        last_eval = (step, scores["perplexity"])
        log.info("eval step %d | val loss %.4f | val ce %.4f | val ppl %.2f (unigram %.2f)%s", step, val_loss,
                 scores["ce"], scores["perplexity"], data.unigram_perplexity, " | new best" if improved else "")
        plot_loss_curves(read_jsonl(metrics_path), plot_path, unigram_perplexity=data.unigram_perplexity)
        if improved and step % t.save_steps:
          save(step, val_loss)  # keeps the best model on disk even between regular saves
          last_saved_step, last_save_time = step, time.perf_counter()

      if (step % t.sample_steps == 0 or out_of_time) and jax.process_count() > 1:
        log.info("step %d: no samples during multi-process training; run --mode=generate on the checkpoint", step)
      elif step % t.sample_steps == 0 or out_of_time:
        text = write_samples(config, graphdef, state.params, data.tokenizer, workdir, step, sharding)
        writer.write_texts(step, {"samples": text.replace("\n", "  \n")})

      due = step % t.save_steps == 0 or last or agreed["preempted"] or agreed["save_interval"]
      if due and step != last_saved_step:
        save(step, val_loss)
        last_saved_step, last_save_time = step, time.perf_counter()
      if agreed["preempted"]:
        stop_reason = preemption.signal_name or "a preemption signal to another process"
        break
      if out_of_time:
        stop_reason = f"training.max_train_minutes={t.max_train_minutes} reached"
        break

    writer.flush()
    checkpointer.close()
    uploader.close(60 * t.backup_wait_minutes)
  writer.close()
  kept = checkpointer.steps()
  plot_loss_curves(read_jsonl(metrics_path), plot_path, unigram_perplexity=data.unigram_perplexity)
  log.info("stopped at step %d (%s); checkpoints %s in %s; loss curves %s", step, stop_reason,
           kept, checkpointer.directory, plot_path)
  if last_eval is not None:
    log.info("validation perplexity %.2f at step %d; unigram perplexity %.2f", last_eval[1], last_eval[0],
             data.unigram_perplexity)
  return exit_code


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
