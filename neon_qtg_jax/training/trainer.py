"""--mode=train: data on first use, then the training loop with its hooks (training/loop.py, hooks.py).

Outputs under the workdir: checkpoints/, tensorboard/, outputs/logs/{training.log,metrics.jsonl},
outputs/samples/step_XXXXXXX.txt and outputs/plots/loss.png (training/outputs.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections

from neon_qtg_jax import info, parallel
from neon_qtg_jax.checkpoint.checkpointer import Checkpointer, checkpoint_dir
from neon_qtg_jax.parallel import ShardingConfig, inputs
from neon_qtg_jax.training import hooks, observe, optimizer, resume, spike, watchdog
from neon_qtg_jax.training import train_step as ts
from neon_qtg_jax.training import workdir_lock
from neon_qtg_jax.training.loop import Loop
from neon_qtg_jax.training.outputs import RunOutputs, describe_devices, flat_config, open_outputs

log = logging.getLogger("neon_qtg_jax")


@dataclasses.dataclass
class RunData:
  train_iter: Any
  eval_batches: list[dict[str, jax.Array]]
  tokenizer: Any
  unigram_perplexity: float


def load_data(config: ml_collections.ConfigDict, sharding: ShardingConfig) -> RunData:
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


def peak_flops(config: ml_collections.ConfigDict) -> float:
  """The device's dense peak FLOP/s for MFU: the data sheet's, else (CPU) a measured float32 matmul rate."""
  kind = jax.devices()[0].device_kind
  peak = info.peak_flops(kind, config.model.dtype)
  if peak is None:
    peak = observe.measured_matmul_flops()
    log.info("MFU is against a measured float32 matmul rate of %.1f GFLOP/s per device (no data-sheet peak for %s)",
             peak / 1e9, kind)
  return peak


def scaled_learning_rate(config: ml_collections.ConfigDict, lr_scale: float) -> ml_collections.ConfigDict:
  """A copy of config whose schedule (training.lr, training.end_lr) is multiplied by lr_scale."""
  if lr_scale == 1.0:
    return config
  out = ml_collections.ConfigDict(config.to_dict())
  out.training.lr *= lr_scale
  out.training.end_lr *= lr_scale
  return out


def add_hooks(loop: Loop, config: ml_collections.ConfigDict, sharding: ShardingConfig, data: RunData, graphdef: Any,
              checkpointer: Checkpointer, progress: resume.Progress, outputs: RunOutputs, start_step: int,
              dog: watchdog.Watchdog) -> None:
  """Registers the run's hooks with their schedules, in the order they act at a step (hooks.py explains why the
  order matters).

  A stop signal waits for the evaluation, sample and save phases; the watchdog's beat comes last.
  """
  t = config.training
  evaluate = hooks.Evaluate(ts.make_eval_step(config, graphdef, sharding), data.eval_batches, data.unigram_perplexity,
                            progress, outputs)
  checkpoints = hooks.Checkpoints(config, checkpointer, progress, data.train_iter)
  target = ts.sharded_abstract_state(config, sharding)

  def restore(steps: list[int]) -> tuple[int, ts.TrainState, dict[str, Any]]:
    """The spike guard's rollback: the newest readable checkpoint, data position untouched."""
    checkpoints.checked(checkpointer.wait)
    found = checkpointer.restore_latest_good(steps, params=target.params, opt_state=target.opt_state, config=config)
    if found is None:
      raise RuntimeError(f"no checkpoint of {steps} in {checkpointer.directory} is readable to roll back to")
    return found[0], resume.state_from_items(target, found[1], sharding), found[1]["meta"]

  def make_step(lr_scale: float) -> Any:
    return ts.make_train_step(scaled_learning_rate(config, lr_scale), graphdef, sharding)

  log_step = dict(every=t.log_steps, at_last=True)
  loop.add_hook(observe.Profile(t.profile_start_step, t.profile_num_steps, outputs))
  loop.add_hook(hooks.TrainMetrics(), **log_step)
  loop.add_hook(observe.LayerStats(ts.layer_groups(ts.abstract_train_state(config).params, config.model.num_layers)),
                **log_step)
  loop.add_hook(hooks.Throughput(config, progress, peak_flops(config), info.flops_per_token(config)["train"]),
                **log_step)
  loop.add_hook(observe.DeviceStats(), **log_step)
  loop.add_hook(hooks.Backup(outputs.start_uploader(config, start_step), t.backup_wait_minutes), **log_step)
  loop.add_hook(hooks.LogLine(t.total_steps), **log_step)
  loop.add_hook(watchdog.awaited_by_stop(
      spike.SpikeGuard(config, checkpointer, progress, restore=restore, make_step=make_step,
                       also_due=lambda ctx: loop.is_due(evaluate, ctx) or checkpoints.will_save(ctx)),
      dog, "the spike guard"), **log_step)
  loop.add_hook(watchdog.awaited_by_stop(evaluate, dog, "evaluating"), every=t.eval_steps, at_last=True)
  loop.add_hook(watchdog.awaited_by_stop(hooks.Samples(config, graphdef, data.tokenizer, sharding, outputs), dog,
                                         "sampling"), every=t.sample_steps)
  loop.add_hook(watchdog.awaited_by_stop(checkpoints, dog, "saving"))  # its own policy (save_steps, interval, ...)
  loop.add_hook(hooks.StopSignals(t.max_train_minutes))
  loop.add_hook(watchdog.Beat(dog))


def run(config: ml_collections.ConfigDict, args: Any) -> int:
  workdir, t = os.path.abspath(args.workdir), config.training
  sharding = ShardingConfig.from_config(config.parallel)
  inputs.check_batch(config, sharding)  # a ConfigError before any work
  lock = workdir_lock.acquire(workdir, writer=jax.process_index() == 0)  # one run per workdir, before any write
  outputs = open_outputs(workdir)
  log.info("workdir %s; devices: %s; mesh %s", workdir, describe_devices(), parallel.describe(sharding.mesh))
  checkpointer = Checkpointer(checkpoint_dir(workdir), keep=t.keep_checkpoints,  # failures: hooks.Checkpoints
                              timeout_minutes=t.save_timeout_minutes)
  plan = resume.plan(config, args.resume_from, checkpointer)
  data = load_data(config, sharding)
  log.info("data ready: %d validation batches; unigram perplexity of the validation split: %.2f",
           len(data.eval_batches), data.unigram_perplexity)

  graphdef = ts.model_graphdef(config)
  with watchdog.Watchdog(t.collective_timeout_minutes, t.stop_grace_seconds,
                         f"process {jax.process_index()} of {jax.process_count()}") as dog:
    state, progress = resume.restore_or_init(
        config, args, checkpointer, ts.sharded_abstract_state(config, sharding), data.train_iter, sharding,
        lambda: ts.create_train_state(config, jax.random.PRNGKey(config.seed), sharding)[1], plan)
    start_step = int(jax.device_get(state.step))  # waits for the initial state: the watchdog times this too
    dog.started(start_step)
    if dog.stop_requested:
      outputs.close()
      lock.release()
      log.info("stopped before the first step (%s): the state at step %d is the one the run started from",
               dog.stop_requested, start_step)
      return 0
    exit_code = _train(config, sharding, checkpointer, data, graphdef, state, progress, outputs, start_step, dog)
  lock.release()
  return exit_code


def _train(config: ml_collections.ConfigDict, sharding: ShardingConfig, checkpointer: Checkpointer, data: RunData,
           graphdef: Any, state: ts.TrainState, progress: resume.Progress, outputs: RunOutputs, start_step: int,
           dog: watchdog.Watchdog) -> int:
  """The loop from start_step with its hooks, then the run's last log line."""
  t = config.training
  if start_step == 0:
    outputs.writer.write_hparams(flat_config(config))
  log.info("training steps %d..%d of %d; %d tokens per step; %s parameters", start_step, t.total_steps,
           t.total_steps, ts.tokens_per_step(config), f"{sum(x.size for x in jax.tree.leaves(state.params)):,}")
  note = optimizer.schedule_note(t)
  if note:
    log.info("%s", note)
  global_rows = t.batch_size * t.grad_accum_steps

  loop = Loop(train_step=ts.make_train_step(scaled_learning_rate(config, progress.lr_scale), graphdef, sharding),
              next_batch=lambda: inputs.global_batch(next(data.train_iter), sharding, global_rows),
              total_steps=t.total_steps, write_scalars=outputs.write_scalars)
  add_hooks(loop, config, sharding, data, graphdef, checkpointer, progress, outputs, start_step, dog)
  stop = loop.run(state, start_step)
  outputs.close()
  log.info("stopped at step %d (%s); checkpoints %s in %s; loss curves %s", loop.step, stop.reason,
           checkpointer.steps(), checkpointer.directory, outputs.plot_path)
  if stop.error is not None:
    raise stop.error
  return stop.exit_code
