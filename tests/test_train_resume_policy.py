"""Where a resume starts, and what it may move or delete (issue 17, items 3 and 4).

- The newest intact checkpoint wins wherever it is: a local step that cannot be read is replaced by
  the backup's verified copy of the same step, not by an older local one; the backup keeps it.
- The uploader deletes no backup step at or after the restored one until it uploaded a newer step.
- A checkpoint of another model shape is an error naming the parameter and the config field
  (exit 2), and nothing is moved; only unreadable data is moved aside.

Training runs are launch.py subprocesses with test_train_resume's tiny overrides and compilation cache.
"""

import os
import shutil
import subprocess
import time

import pytest

import test_train_resume as train_runs
from neon_qtg_jax.checkpoint import storage
from neon_qtg_jax.checkpoint.uploader import BackupUploader
from test_train_resume import data_dir, reference  # noqa: F401 - fixtures


def corrupt_params(step_dir: str) -> None:
  for dirpath, _, filenames in os.walk(os.path.join(step_dir, "params")):
    for name in filenames:
      if "metadata" not in name.lower():
        with open(os.path.join(dirpath, name), "wb") as f:
          f.write(b"not a checkpoint")


@pytest.mark.slow  # CI restores from the backup in test_train_backup.py; this adds the unreadable local step
def test_an_unreadable_local_step_is_taken_from_the_backup_and_the_backup_keeps_it(data_dir, tmp_path):  # noqa: F811
  workdir, backup = str(tmp_path / "run"), str(tmp_path / "backup")
  first = train_runs.run(data_dir, workdir, 8, f"--config.training.backup_url={backup}")
  assert first.returncode == 0, first.stdout + first.stderr
  assert storage.backed_up_steps(backup) == [4, 8]
  index_8 = open(os.path.join(backup, "checkpoints", "8", storage.INDEX_FILE), encoding="utf-8").read()
  corrupt_params(os.path.join(workdir, "checkpoints", "8"))

  seen = train_runs.num_records(workdir)
  result = train_runs.run(data_dir, workdir, 10, f"--config.training.backup_url={backup}")
  assert result.returncode == 0, result.stdout + result.stderr
  # Not the older local step 4: the backup's verified copy of step 8.
  assert "/8 is unreadable" in result.stdout and "fetched step 8" in result.stdout
  assert f"resumed from {os.path.join(workdir, 'checkpoints')}/8 (fetched from the backup" in result.stdout
  assert sorted(train_runs.losses(workdir, skip_records=seen)) == [9, 10]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8.unreadable"))  # kept for the user
  # The backup still holds the step the run restored, unchanged, beside the new one.
  assert storage.backed_up_steps(backup) == [4, 8, 10]
  assert open(os.path.join(backup, "checkpoints", "8", storage.INDEX_FILE), encoding="utf-8").read() == index_8
  assert "deleting step" not in result.stdout


def _write_step(directory, step: int, payload: bytes) -> None:
  os.makedirs(os.path.join(directory, str(step), "params"))
  with open(os.path.join(directory, str(step), "params", "a"), "wb") as f:
    f.write(payload)


def _wait_until(predicate, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, "the uploader did not get there in time"
    time.sleep(0.02)


def test_the_uploader_deletes_nothing_after_the_restored_step_until_it_uploaded_a_newer_one(tmp_path):
  local, backup = str(tmp_path / "run" / "checkpoints"), str(tmp_path / "backup")
  for step in (4, 8, 12):  # the backup of an earlier run: 12 is newer than what this run restores
    _write_step(str(tmp_path / "old"), step, f"old {step}".encode())
    storage.upload_dir(str(tmp_path / "old" / str(step)), storage.location(backup) / "checkpoints" / str(step))
  _write_step(local, 4, b"old 4")  # the run resumed from step 4
  uploader = BackupUploader(backup, local, {}, start_step=4, poll_seconds=0.02)
  try:
    time.sleep(0.5)  # several sync rounds with nothing new to upload
    assert storage.backed_up_steps(backup) == [4, 8, 12]
    _write_step(local, 6, b"six of the new branch")
    _wait_until(lambda: 6 in storage.backed_up_steps(backup))
    _wait_until(lambda: storage.backed_up_steps(backup) == [4, 6])  # now the abandoned 8 and 12 go
  finally:
    assert uploader.close(30)


def test_a_checkpoint_of_another_model_shape_is_an_error_and_nothing_is_moved(data_dir, reference, tmp_path):  # noqa: F811
  reference_dir, _, _ = reference
  workdir = str(tmp_path)
  shutil.copytree(os.path.join(reference_dir, "checkpoints"), os.path.join(workdir, "checkpoints"))
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  result = train_runs.run(data_dir, workdir, 12, "--config.model.mlp_ratio=2")
  assert result.returncode == 2, result.stdout + result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr
  assert "checkpoint 8" in errors[0] and "params blocks/w_1/kernel is (1, 32, 64) in the checkpoint and " \
      "(1, 32, 32) in this run" in errors[0]
  assert "model.mlp_ratio = 2 here, 4 in the checkpoint" in errors[0] and "nothing was moved" in errors[0]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing moved aside or deleted
  assert "starting from step 0" not in result.stdout


def test_only_unreadable_data_is_moved_aside_and_a_named_unreadable_step_is_an_error(data_dir, reference, tmp_path):  # noqa: F811
  reference_dir, _, _ = reference
  workdir = str(tmp_path)
  shutil.copytree(os.path.join(reference_dir, "checkpoints"), os.path.join(workdir, "checkpoints"))
  corrupt_params(os.path.join(workdir, "checkpoints", "4"))
  result = train_runs.run(data_dir, workdir, 8, "--resume_from=4")
  assert result.returncode == 2, result.stdout + result.stderr
  assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
      f"error: checkpoint {os.path.join(workdir, 'checkpoints')}/4 is unreadable (see the warning above)"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:1] == ["4.unreadable"]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))  # the readable step is untouched
