"""Checkpoint contents are verified (issue 28, item 3): a checksum per file recorded at commit and checked on
restore, in training (fall back, resume bit for bit), evaluation and serving (one line, exit 2); non-finite
parameters are rejected."""

import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import test_train_resume as train_runs
from test_train_resume import data_dir, reference  # noqa: F401 - fixtures
from neon_qtg_jax.checkpoint import checkpointer as ckpt
from neon_qtg_jax.checkpoint import integrity
from neon_qtg_jax.checkpoint.checkpointer import Checkpointer
from neon_qtg_jax.config import default_config
from neon_qtg_jax.model import QTGModel


def largest_params_file(step_dir: str) -> str:
  """The params data file holding the most bytes (the embedding's chunk, in a tiny model)."""
  files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, "params")) for n in names]
  return max(files, key=os.path.getsize)


def flip_bytes(path: str, count: int = 64) -> None:
  """Inverts `count` bytes in the middle of the file; its size is unchanged."""
  with open(path, "r+b") as f:
    size = os.path.getsize(path)
    offset = size // 2 - count // 2
    f.seek(offset)
    data = f.read(count)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


def small_state(nan: bool = False):
  config = default_config()
  config.model.update(dict(vocab_size=64, embed_dim=16, num_layers=1, num_heads=2, max_seq_len=16))
  params = nnx.state(QTGModel(config.model, rngs=nnx.Rngs(0)), nnx.Param)
  if nan:
    pure = params.to_pure_dict()
    leaves, tree = jax.tree.flatten(pure)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    nnx.replace_by_pure_dict(params, jax.tree.unflatten(tree, leaves))
  return config, params, optax.adam(1e-3).init(params.to_pure_dict())


def save(directory: str, step: int, nan: bool = False) -> tuple[Checkpointer, object, object]:
  config, params, opt_state = small_state(nan)
  checkpointer = Checkpointer(directory, keep=5)
  checkpointer.save(step, params=params, opt_state=opt_state, meta={"step": step}, config=config)
  checkpointer.wait()
  return checkpointer, params, opt_state


def test_every_committed_step_records_its_files_and_a_flipped_byte_is_unreadable(tmp_path):
  checkpointer, params, opt_state = save(str(tmp_path / "ck"), 1)
  save_again = lambda step: checkpointer.save(step, params=params, opt_state=opt_state, meta={"step": step},
                                              config=small_state()[0])
  save_again(2)
  checkpointer.wait()
  step_dir = os.path.join(checkpointer.directory, "2")
  algorithm, recorded = integrity.recorded(step_dir)
  assert algorithm == "xxh3_128"
  assert {name.split("/")[0] for name in recorded} >= {"params", "opt_state", "meta", "config"}
  assert integrity.verify(step_dir, ["params", "opt_state", "meta"]) is True
  restored = checkpointer.restore(2, params=params, opt_state=opt_state)
  assert restored["meta"]["step"] == 2

  flip_bytes(largest_params_file(step_dir))
  with pytest.raises(integrity.ChecksumMismatch, match="params/.* differs from the checksum recorded"):
    checkpointer.restore(2, params=params, opt_state=opt_state)
  # try_restore: moved aside, the previous step used; nothing deleted.
  step, _ = checkpointer.restore_latest_good([1, 2], params=params, opt_state=opt_state)
  assert step == 1 and os.path.isdir(step_dir + ".unreadable") and checkpointer.steps() == [1]
  checkpointer.close()


def test_a_checkpoint_saved_without_checksums_restores_unverified(tmp_path):
  checkpointer, params, opt_state = save(str(tmp_path / "ck"), 3)
  os.remove(os.path.join(checkpointer.directory, "3", integrity.CHECKSUM_FILE))
  assert checkpointer.restore(3, params=params, opt_state=opt_state)["meta"]["step"] == 3
  checkpointer.close()


def test_non_finite_parameters_are_rejected_on_restore(tmp_path):
  checkpointer, params, opt_state = save(str(tmp_path / "ck"), 5, nan=True)
  with pytest.raises(integrity.NonFiniteParameters, match="1 non-finite parameter values"):
    checkpointer.restore(5, params=params, opt_state=opt_state)
  assert checkpointer.try_restore(5, params=params, opt_state=opt_state) is None  # unreadable: moved aside
  assert os.path.isdir(os.path.join(checkpointer.directory, "5.unreadable"))
  checkpointer.close()
  # The params-only read (evaluation, sampling, serving) refuses it too.
  shutil.move(os.path.join(checkpointer.directory, "5.unreadable"), os.path.join(checkpointer.directory, "5"))
  abstract = nnx.state(nnx.eval_shape(lambda: QTGModel(small_state()[0].model, rngs=nnx.Rngs(0))))
  with pytest.raises(integrity.NonFiniteParameters):
    ckpt.restore_params(checkpointer.directory, 5, abstract)


def test_a_flipped_params_byte_is_moved_aside_and_training_resumes_identically(data_dir, reference, tmp_path):  # noqa: F811
  # The 8-step reference saved steps 4 and 8; 64 bytes flipped inside step 8's params (size unchanged):
  # the resume finds it, moves it aside, restarts from step 4 and logs the reference's losses for 5..8.
  ref_workdir, ref_losses, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_workdir, workdir)
  step8 = os.path.join(workdir, "checkpoints", "8")
  flip_bytes(largest_params_file(step8))
  skip = train_runs.num_records(workdir)
  result = train_runs.run(data_dir, workdir, 8)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "differs from the checksum recorded at its commit" in result.stdout, result.stdout
  assert os.path.isdir(step8 + ".unreadable")
  resumed = train_runs.losses(workdir, skip)
  assert sorted(resumed) == [5, 6, 7, 8]
  assert all(resumed[s] == ref_losses[s] for s in resumed), (resumed, ref_losses)


def test_evaluation_refuses_a_flipped_checkpoint_in_one_line(data_dir, reference, tmp_path):  # noqa: F811
  ref_workdir, _, _ = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_workdir, workdir)
  flip_bytes(largest_params_file(os.path.join(workdir, "checkpoints", "8")))
  cmd = train_runs.command(data_dir, workdir, 8)
  cmd[cmd.index("--mode=train")] = "--mode=eval"
  result = subprocess.run(cmd + ["--checkpoint=8"], cwd=train_runs.ROOT, capture_output=True, text=True,
                          timeout=300, env=train_runs.SUBPROCESS_ENV)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stdout + result.stderr
  assert lines[-1].startswith("error: checkpoint ") and "differs from the checksum recorded" in lines[-1], lines
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))  # evaluation moves nothing
