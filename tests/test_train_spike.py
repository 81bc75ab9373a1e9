"""The loss-spike guard: its decisions on a scripted loss sequence, and a real run with one corrupted batch.

The real run trains the tiny model in this process twice: once on clean data and once with a
test-only data hook that replaces one batch's targets by the tokenizer's <unk> id (a loss spike). The
guarded run must roll back to the checkpoint before it, skip the batches since (the data position
moves on), and end with a loss within noise of the clean run.
"""

import math
import os
import types

import jax
import ml_collections
import numpy as np
import pytest

from neon_qtg_jax.cli import RunArgs
from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.training import spike, trainer
from neon_qtg_jax.training.loop import Loop
from neon_qtg_jax.training.metric_writers import read_jsonl
from neon_qtg_jax.training.resume import Progress
from tests.test_train_resume import data_dir, overrides  # noqa: F401 - data_dir is a fixture


def guard_config(**training):
  c = default_config()
  c.training.update(dict(log_steps=5, spike_window=10, spike_sigmas=6.0, spike_lr_scale=0.5, spike_max_rollbacks=2,
                         spike_rollback_window=100, max_consecutive_nonfinite=3, eval_steps=1000, save_steps=10,
                         total_steps=60))
  c.training.update(training)
  return validate(c)


class ScriptedRun:
  """A loop whose 'train step' replays a loss script indexed by the step, and a fake checkpoint store."""

  def __init__(self, config, script, checkpoints=(10, 20)):
    self.script, self.checkpoints, self.scales, self.progress = script, list(checkpoints), [], Progress()
    self.guard = spike.SpikeGuard(config, types.SimpleNamespace(steps=lambda: list(self.checkpoints), directory="ckpt"),
                                  self.progress, restore=self.restore, make_step=self.make_step,
                                  also_due=lambda ctx: False)
    self.loop = Loop(train_step=self.step, next_batch=lambda: None, total_steps=config.training.total_steps,
                     write_scalars=lambda step, scalars: None)
    self.loop.add_hook(self.guard, every=config.training.log_steps, at_last=True)
    self.trained: list[int] = []

  def state(self, step):
    return types.SimpleNamespace(step=step, nonfinite_streak=np.int32(0))

  def step(self, state, batch):
    step = state.step + 1
    self.trained.append(step)
    loss = self.script(step, len(self.trained))
    return self.state(step), {"loss": np.float32(loss), "finite": np.bool_(math.isfinite(loss))}

  def restore(self, steps):
    return max(steps), self.state(max(steps)), {"best_val_loss": 1.0}

  def make_step(self, scale):
    self.scales.append(scale)
    return self.step

  def run(self):
    return self.loop.run(self.state(0), 0)


def noise(step):
  return 5.0 + 0.05 * math.sin(1.7 * step)


def test_a_spike_rolls_back_to_the_checkpoint_before_it_and_scales_the_learning_rate():
  # One spike at step 33, found at the log step 35 (log_steps 5): back to checkpoint 30, then on to step 60.
  run = ScriptedRun(guard_config(), lambda step, n: 9.0 if n == 33 else noise(step), checkpoints=(20, 30))
  stop = run.run()
  assert stop.reason == "finished" and run.loop.step == 60
  assert run.progress.rollbacks == [33] and run.progress.lr_scale == 0.5 and run.scales == [0.5]
  assert run.trained[:37] == list(range(1, 36)) + [31, 32]  # steps 31..35 trained again on later batches
  assert len(run.trained) == 65  # 5 more batches drawn than steps: the skipped ones


def test_non_finite_steps_are_one_case_and_the_guard_gives_up_after_max_rollbacks():
  # Every step from the 25th trained on is NaN: the third in a row (step 27) is found at log step 30 and
  # rolls back to 20; again at step 23 (found at 25); the third time the run stops (spike_max_rollbacks 2).
  run = ScriptedRun(guard_config(), lambda step, n: float("nan") if n >= 25 else noise(step))
  stop = run.run()
  assert (stop.reason, stop.exit_code, run.loop.step) == ("non-finite", spike.EXIT_UNSTABLE, 25)
  assert run.progress.rollbacks == [27, 23] and run.scales == [0.5, 0.25]


def test_without_a_checkpoint_or_with_the_guard_off():
  run = ScriptedRun(guard_config(), lambda step, n: 9.0 if n == 15 else noise(step), checkpoints=())
  stop = run.run()
  assert (stop.reason, stop.exit_code, run.loop.step) == ("spike", 1, 15)  # nothing to go back to
  run = ScriptedRun(guard_config(spike_sigmas=0.0), lambda step, n: 9.0 if n == 15 else noise(step))
  assert run.run().reason == "finished" and run.progress.rollbacks == []
  stats = spike.LossStats(window=3)
  for loss in (1.0, 1.0, 1.0):
    stats.add(loss)
  assert not stats.is_spike(100.0, 0.0) and stats.is_spike(1.0 + 1e-3, 6.0)  # zero variance: any rise


class CorruptOneBatch:
  """Test-only data hook: the `index`-th batch drawn (1-based) gets targets that are all one token.

  Everything else (Grain's get_state / set_state for checkpoints) goes to the wrapped iterator.
  """

  def __init__(self, iterator, index: int | None, token: int):
    self.iterator, self.index, self.token, self.drawn = iterator, index, token, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.iterator)
    self.drawn += 1
    if self.drawn == self.index:
      batch = dict(batch, targets=np.full_like(batch["targets"], self.token))
    return batch

  def __getattr__(self, name):
    return getattr(self.iterator, name)


def train(data_dir, workdir, monkeypatch, corrupt_at):  # noqa: F811
  config = default_config()
  for key, value in overrides(data_dir).items():
    section, name = key.split(".")
    config[section][name] = value
  config.training.update(dict(total_steps=40, log_steps=1, save_steps=10, eval_steps=40, sample_steps=1000,
                              spike_window=10, spike_sigmas=6.0, spike_lr_scale=1.0))
  validate(config)
  wrapped = []
  load = trainer.load_data

  def load_corrupted(config, sharding):
    data = load(config, sharding)
    data.train_iter = CorruptOneBatch(data.train_iter, corrupt_at, token=0)  # <unk>: never a target in the data
    wrapped.append(data.train_iter)
    return data

  monkeypatch.setattr(trainer, "load_data", load_corrupted)
  assert trainer.run(config, RunArgs(workdir=workdir)) == 0
  records = read_jsonl(os.path.join(workdir, "outputs", "logs", "metrics.jsonl"))
  with open(os.path.join(workdir, "outputs", "logs", "training.log"), encoding="utf-8") as f:
    return records, f.read(), wrapped[0].drawn


def last_records(records, key):
  """step -> the value of `key` in the last record of that step (a step logged again after a rollback)."""
  return {r["step"]: r[key] for r in records if key in r}


def test_spike_from_a_corrupted_batch_rolls_back_skips_it_and_ends_within_noise_of_a_clean_run(
    data_dir, tmp_path, monkeypatch):  # noqa: F811
  clean, clean_log, clean_drawn = train(data_dir, str(tmp_path / "clean"), monkeypatch, corrupt_at=None)
  bad, bad_log, bad_drawn = train(data_dir, str(tmp_path / "bad"), monkeypatch, corrupt_at=33)
  assert "rolled back" not in clean_log and clean_drawn == 40
  # Step 33 trains on the corrupted batch: its loss is a spike; checkpoint 30 is restored and steps 31..33
  # run again on the next batches: 3 batches skipped, the corrupted one among them.
  assert "step 33: loss" in bad_log and "rolled back to checkpoint 30, skipping the batches of steps 31..33" in bad_log
  assert bad_drawn == 43
  assert [(r["step"], r["spike/rolled_back_to"]) for r in bad if "spike/rollbacks" in r] == [(33, 30)]
  spiked = [r["train/loss"] for r in bad if r.get("step") == 33 and "train/loss" in r]
  clean_loss, bad_loss = last_records(clean, "train/loss"), last_records(bad, "train/loss")
  tail = range(31, 41)
  clean_tail, bad_tail = np.array([clean_loss[s] for s in tail]), np.array([bad_loss[s] for s in tail])
  # Within noise: the mean loss of steps 31..40 differs from the clean run's by less than 3 standard errors
  # of that mean (the clean run's step-to-step spread over those steps).
  tolerance = 3 * clean_tail.std() / math.sqrt(len(tail))
  print(f"loss at the corrupted step 33: {spiked[0]:.3f} (clean run: {clean_loss[33]:.3f}); mean loss of steps 31..40: "
        f"clean {clean_tail.mean():.4f}, corrupted batch with the guard {bad_tail.mean():.4f}, tolerance {tolerance:.4f}; "
        f"final val loss clean {last_records(clean, 'val/loss')[40]:.4f}, guarded {last_records(bad, 'val/loss')[40]:.4f}")
  assert spiked[0] > clean_loss[33] + 1.0
  assert abs(bad_tail.mean() - clean_tail.mean()) < tolerance
