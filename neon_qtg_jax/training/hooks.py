"""The hooks of a training run (loop.Hook): metrics and the log line, progress, evaluation, samples, checkpoints,
the backup, and stopping on a signal or the time limit.

Order matters where hooks share a step: the metric hooks fill `ctx.scalars` before the log line,
the spike guard runs before anything saves, evaluation before the checkpoint it may make the best,
the checkpoint before a stop, and (at the end) the last save finishes before the backup waits for it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from neon_qtg_jax.checkpoint.checkpointer import Checkpointer
from neon_qtg_jax.checkpoint.errors import CheckpointSaveError
from neon_qtg_jax.parallel import ShardingConfig, decisions
from neon_qtg_jax.training import train_step as ts
from neon_qtg_jax.training.loop import Hook, Loop, StepContext
from neon_qtg_jax.training.outputs import RunOutputs
from neon_qtg_jax.training.preemption import PreemptionFlag
from neon_qtg_jax.training.resume import Progress, iterator_args

log = logging.getLogger("neon_qtg_jax")

EXIT_SAVE_FAILED = 2
WINDOW_MEANS = ("loss", "ce", "topo", "geo", "quantum", "grad_norm")


class TrainMetrics(Hook):
  """The train/* scalars of each log step: means over the steps since the previous one (one device sync)."""

  def __init__(self):
    self.window: list[Mapping[str, jax.Array]] = []

  def observe(self, ctx: StepContext) -> None:
    self.window.append({k: ctx.metrics[k] for k in (*WINDOW_MEANS, "param_norm", "lr", "finite")})

  def rewound(self, step: int) -> None:
    self.window = []

  def run(self, ctx: StepContext, loop: Loop) -> None:
    fetched, self.window = jax.device_get(self.window), []
    out = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in WINDOW_MEANS}
    out["train/perplexity"] = math.exp(out["train/ce"])
    out["train/param_norm"] = float(fetched[-1]["param_norm"])
    out["train/lr"] = float(fetched[-1]["lr"])
    out["train/nonfinite_steps"] = float(sum(1 - float(m["finite"]) for m in fetched))
    ctx.scalars.update(out)


class Throughput(Hook):
  """Progress: steps/s, tokens/s, model FLOP/s and MFU, step time split into data wait and compute; the run's
  training time. MFU = model FLOPs per token (info.flops_per_token) x tokens/s / (peak x devices).

  The first step compiles: it is timed on its own and left out of the rates. Times are the host's:
  the data wait is the time next() took, compute the rest of the step (dispatch, device work the
  host waited for).
  """

  def __init__(self, config: ml_collections.ConfigDict, progress: Progress, peak_flops: float | None,
               flops_per_token: float):
    self.tokens_per_step = ts.tokens_per_step(config)
    self.progress, self.peak_flops, self.flops_per_token = progress, peak_flops, flops_per_token
    self.first_step: int | None = None
    self.log_step = False  # the schedule falls on the step being run (not only the first, compiling step)

  def start(self, loop: Loop) -> None:
    self.first_step = loop.step + 1
    self._reset(time.perf_counter(), untimed=0)

  def _reset(self, now: float, untimed: int) -> None:
    self.started, self.steps, self.untimed, self.data_wait = now, 0, untimed, 0.0

  def observe(self, ctx: StepContext) -> None:
    self.steps += 1
    self.data_wait += ctx.data_wait

  def due(self, ctx: StepContext, scheduled: bool) -> bool:
    self.log_step = scheduled
    return ctx.step == self.first_step or scheduled

  def run(self, ctx: StepContext, loop: Loop) -> None:
    if ctx.step == self.first_step:
      jax.block_until_ready(ctx.metrics)
      log.info("first step (compilation included) took %.1f s", time.perf_counter() - self.started)
      self._reset(time.perf_counter(), untimed=1)
      self.steps = 1
      if not self.log_step:
        return
    now = time.perf_counter()
    elapsed, timed = now - self.started, self.steps - self.untimed
    self.progress.train_seconds += elapsed
    self._reset(now, untimed=0)
    if timed <= 0:  # only the compiling first step: no rates yet
      return
    tokens_per_s = timed * self.tokens_per_step / elapsed
    model_flops = self.flops_per_token * tokens_per_s
    ctx.scalars.update({"perf/step_time_s": elapsed / timed, "perf/steps_per_s": timed / elapsed,
                        "perf/tokens_per_s": tokens_per_s, "perf/data_wait_s": self.data_wait / timed,
                        "perf/compute_s": (elapsed - self.data_wait) / timed,
                        "perf/data_wait_fraction": self.data_wait / elapsed,
                        "perf/model_tflops_per_s": model_flops / 1e12})
    if self.peak_flops:
      ctx.scalars["perf/mfu"] = model_flops / (self.peak_flops * jax.device_count())


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def rate_text(scalars: Mapping[str, float], steps_left: int) -> str:
  if "perf/steps_per_s" not in scalars:
    return ""
  mfu = f" | MFU {scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else ""
  return (f" | {scalars['perf/steps_per_s']:.2f} steps/s | {scalars['perf/tokens_per_s']:.0f} tok/s{mfu}"
          f" | ETA {_duration(steps_left / scalars['perf/steps_per_s'])}")


class LogLine(Hook):
  """The console line of each log step from the step's scalars, and the count of skipped non-finite steps."""

  def __init__(self, total_steps: int):
    self.total_steps = total_steps

  def run(self, ctx: StepContext, loop: Loop) -> None:
    s = ctx.scalars
    log.info("step %d/%d | loss %.4f | ce %.4f | ppl %.2f | lr %.2e | gnorm %.3f%s", ctx.step, self.total_steps,
             s["train/loss"], s["train/ce"], s["train/perplexity"], s["train/lr"], s["train/grad_norm"],
             rate_text(s, self.total_steps - ctx.step))
    if s["train/nonfinite_steps"]:
      log.warning("%d non-finite step(s) skipped since the previous log line (parameters and optimizer "
                  "state kept); %d in total", s["train/nonfinite_steps"], int(jax.device_get(ctx.state.nonfinite_total)))


def evaluate(eval_step: Callable[[nnx.State, ts.Batch], ts.Metrics], params: nnx.State,
             batches: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Mean of every loss term over the fixed validation batches (all hold full windows), and the perplexity."""
  per_batch = jax.device_get([eval_step(params, b) for b in batches])
  out = {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}
  out["perplexity"] = math.exp(out["ce"])
  return out


class Evaluate(Hook):
  """val/* on the fixed validation batches at the steps of its schedule (eval_steps and the last); the
  loss-curve PNG."""

  def __init__(self, eval_step: Callable, batches: list, unigram_perplexity: float, progress: Progress,
               outputs: RunOutputs):
    self.eval_step, self.batches, self.unigram = eval_step, batches, unigram_perplexity
    self.progress, self.outputs = progress, outputs
    self.last_eval: tuple[int, float] | None = None

  def run(self, ctx: StepContext, loop: Loop) -> None:
    scores = evaluate(self.eval_step, ctx.state.params, self.batches)
    ctx.val_loss = scores["loss"]
    ctx.improved = ctx.val_loss < self.progress.best_val_loss
    self.progress.best_val_loss = min(self.progress.best_val_loss, ctx.val_loss)
    ctx.scalars.update({f"val/{k}": v for k, v in scores.items()} | {"val/unigram_perplexity": self.unigram})
    self.last_eval = (ctx.step, scores["perplexity"])
    log.info("eval step %d | val loss %.4f | val ce %.4f | val ppl %.2f (unigram %.2f)%s", ctx.step, ctx.val_loss,
             scores["ce"], scores["perplexity"], self.unigram, " | new best" if ctx.improved else "")
    self.outputs.write_scalars(ctx.step, ctx.scalars)  # now, so that the plot holds this step
    ctx.scalars = {}
    self.outputs.plot_losses(self.unigram)

  def close(self, loop: Loop) -> None:
    self.outputs.plot_losses(self.unigram)
    if self.last_eval is not None:
      log.info("validation perplexity %.2f at step %d; unigram perplexity %.2f", self.last_eval[1],
               self.last_eval[0], self.unigram)


class Samples(Hook):
  """Continuations of sampling.prompts at the steps of its schedule (sample_steps), and when the time limit
  stops the run."""

  def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, tokenizer: Any,
               sharding: ShardingConfig, outputs: RunOutputs):
    self.config, self.graphdef, self.tokenizer, self.sharding, self.outputs = (config, graphdef, tokenizer,
                                                                               sharding, outputs)

  def due(self, ctx: StepContext, scheduled: bool) -> bool:
    return scheduled or ctx.agreed["out_of_time"]

  def run(self, ctx: StepContext, loop: Loop) -> None:
    if jax.process_count() > 1:
      log.info("step %d: no samples during multi-process training; run --mode=generate on the checkpoint", ctx.step)
      return
    from neon_qtg_jax.inference.sampling import continue_prompts  # pylint: disable=import-outside-toplevel
    s, tokenizer = self.config.sampling, self.tokenizer
    prompts = list(s.prompts)
    prompt_ids = [tokenizer.encode(p) or [tokenizer.bos_id] for p in prompts]
    max_new = min(s.max_new_tokens, self.config.model.max_seq_len - max(len(p) for p in prompt_ids))
    outputs = continue_prompts(nnx.merge(self.graphdef, ctx.state.params), prompt_ids, sampling_cfg=s,
                               max_new_tokens=max_new, eos_id=tokenizer.eos_id, seed=s.seed,
                               valid_vocab=tokenizer.vocab_size, sharding=self.sharding)
    text = "\n\n".join(f"=== prompt {i}: {p!r}\n{p}{tokenizer.decode(o)}"
                       for i, (p, o) in enumerate(zip(prompts, outputs)))
    self.outputs.write_samples(ctx.step, f"step {ctx.step}, temperature {s.temperature}, top_k {s.top_k}, "
                                         f"top_p {s.top_p}, seed {s.seed}", text)


class Checkpoints(Hook):
  """Saves every save_steps, every save_interval_minutes, at a new best, at the end and on a stop signal.

  A save that fails on any process (raised now, or found later in the background) is proposed as
  "save_failed"; once agreed, every process stops together (training.on_save_error="stop", exit 2
  with the error) or logs it and goes on ("continue").
  """
  proposals = ("save_interval", "save_failed")

  def __init__(self, config: ml_collections.ConfigDict, checkpointer: Checkpointer, progress: Progress,
               train_iter: Any):
    self.config, self.t = config, config.training
    self.checkpointer, self.progress, self.train_iter = checkpointer, progress, train_iter
    self.failure: CheckpointSaveError | None = None
    self.handled_at = -1  # the step at which the last agreed failure was acted on
    self.last_saved, self.last_save_time = -1, time.perf_counter()

  def start(self, loop: Loop) -> None:
    self.last_saved, self.last_save_time = loop.step, time.perf_counter()

  def rewound(self, step: int) -> None:
    self.last_saved = step  # the restored checkpoint

  def checked(self, action: Callable[[], None]) -> None:
    """Runs a checkpointer call; a CheckpointSaveError it raises becomes this process's save_failed proposal."""
    try:
      action()
    except CheckpointSaveError as err:
      self.failure = self.failure or err

  def propose(self, step: int) -> Mapping[str, bool]:
    self.checked(self.checkpointer.check)  # a save that failed in the background (disk full)
    return {"save_interval": time.perf_counter() - self.last_save_time >= 60 * self.t.save_interval_minutes,
            "save_failed": self.failure is not None}

  def will_save(self, ctx: StepContext) -> bool:
    interval = ctx.agreed["save_interval"] and ctx.agreed.step >= self.last_saved  # proposed after the last save
    due = (ctx.step % self.t.save_steps == 0 or ctx.last or ctx.agreed["preempted"] or interval
           or (ctx.improved and ctx.step % self.t.save_steps != 0))
    return due and ctx.step != self.last_saved

  def due(self, ctx: StepContext, scheduled: bool) -> bool:
    return ctx.agreed["save_failed"] or self.will_save(ctx)

  def save(self, state: ts.TrainState, step: int, val_loss: float | None) -> None:
    self.checked(lambda: self.checkpointer.save(
        step, params=state.params, opt_state=state.opt_state, meta=self.progress.meta(state), config=self.config,
        data_args=iterator_args(self.train_iter, save=True), val_loss=val_loss))
    log.info("checkpoint %d saving (asynchronous) to %s", step, self.checkpointer.directory)
    self.last_saved, self.last_save_time = step, time.perf_counter()

  def _failed(self, loop: Loop) -> bool:
    """Acts on an agreed save failure: stops the loop (True) or logs it and goes on (False)."""
    err = self.failure or CheckpointSaveError(f"a checkpoint could not be written on another process; earlier "
                                              f"checkpoints {self.checkpointer.steps()} are intact")
    self.failure, self.handled_at = None, loop.step
    if self.t.on_save_error == "continue":
      log.error("%s; training goes on (training.on_save_error='continue')", err.detail)
      return False
    loop.stop("a checkpoint could not be written", EXIT_SAVE_FAILED, err)
    return True

  def run(self, ctx: StepContext, loop: Loop) -> None:
    failed = ctx.agreed["save_failed"] and ctx.agreed.step > self.handled_at  # not one acted on already
    if self.will_save(ctx):
      # Every process starts the save or none does: the previous save's outcome is agreed first (with
      # several processes a blocking all-gather, once per save).
      self.checked(self.checkpointer.wait)
      failed = failed or decisions.agree({"save_failed": self.failure is not None})["save_failed"]
    if failed and self._failed(loop):
      ctx.dropped = True
      return
    if self.will_save(ctx):
      self.save(ctx.state, ctx.step, ctx.val_loss)

  def close(self, loop: Loop) -> None:
    self.checked(self.checkpointer.close)  # waits for the last save
    if decisions.agree({"save_failed": self.failure is not None})["save_failed"]:
      self._failed(loop)


class Backup(Hook):
  """backup/* at each log step; at the end, waits up to training.backup_wait_minutes for pending uploads."""

  def __init__(self, uploader: Any, wait_minutes: float):
    self.uploader, self.wait_minutes = uploader, wait_minutes

  def run(self, ctx: StepContext, loop: Loop) -> None:
    ctx.scalars.update(self.uploader.scalars())

  def close(self, loop: Loop) -> None:
    self.uploader.close(60 * self.wait_minutes)


class StopSignals(Hook):
  """SIGTERM / SIGINT on any process, or training.max_train_minutes: every process saves the same step and stops."""
  proposals = ("preempted", "out_of_time")

  def __init__(self, max_train_minutes: float):
    self.max_train_minutes = max_train_minutes
    self.flag = PreemptionFlag()
    self.started = time.perf_counter()

  def start(self, loop: Loop) -> None:
    self.flag.__enter__()
    self.started = time.perf_counter()

  def propose(self, step: int) -> Mapping[str, bool]:
    return {"preempted": self.flag.requested,
            "out_of_time": self.max_train_minutes > 0 and time.perf_counter() - self.started >= 60 * self.max_train_minutes}

  def due(self, ctx: StepContext, scheduled: bool) -> bool:
    return ctx.agreed["preempted"] or ctx.agreed["out_of_time"]

  def run(self, ctx: StepContext, loop: Loop) -> None:
    if ctx.agreed["preempted"]:
      loop.stop(self.flag.signal_name or "a preemption signal to another process")
    else:
      loop.stop(f"training.max_train_minutes={self.max_train_minutes} reached")

  def close(self, loop: Loop) -> None:
    self.flag.__exit__(None, None, None)

  def abort(self) -> None:
    self.flag.__exit__(None, None, None)
