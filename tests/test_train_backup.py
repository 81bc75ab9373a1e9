"""Checkpoint backup to an S3-compatible store: a moto server on 127.0.0.1 started by the tests.

Training runs are real launch.py subprocesses with the tiny overrides of test_train_resume; the
store's endpoint and credentials reach them through the environment, as they would in production.
"""

import os
import re
import shutil
import socket
import subprocess
import time

import boto3
import pytest
from moto.server import ThreadedMotoServer

import test_train_resume as train_runs
from neon_qtg_jax.checkpoint import resume
from neon_qtg_jax.checkpoint import storage as backup
from neon_qtg_jax.checkpoint.checkpointer import Checkpointer
from neon_qtg_jax.checkpoint.errors import BackupError
from neon_qtg_jax.checkpoint.uploader import BackupUploader
from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.data import prepare
from optional import needs

needs_s3fs = needs("s3fs", extra="backup", module="s3fs")  # s3:// through fsspec

BUCKET = "backups"


class S3Server:
  """moto in server mode on a free loopback port; stop() and start() keep the stored objects."""

  def __init__(self):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.server = None
    self.start()

  def start(self) -> None:
    self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
    self.server.start()

  def stop(self) -> None:
    self.server.stop()

  @property
  def env(self) -> dict[str, str]:
    # Fail fast while the server is down (botocore's default retries take several seconds per request).
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3": '{"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}'}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
  server = S3Server()
  with pytest.MonkeyPatch.context() as patch:
    for key, value in server.env.items():
      patch.setenv(key, value)
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))  # where URL checkpoints are cached
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield server
  server.stop()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("backup_data")
  path = str(root / "data")
  config = default_config()
  for key, value in train_runs.overrides(path).items():
    section, name = key.split(".")
    config[section][name] = value
  prepare.prepare_dataset(validate(config), progress=False, num_processes=1)
  return path


def train_command(s3: S3Server, data_dir: str, workdir: str, total_steps: int, url: str, *extra: str):
  env = dict(train_runs.SUBPROCESS_ENV, **s3.env, JAX_COMPILATION_CACHE_DIR=os.path.join(
      os.path.dirname(data_dir), "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = train_runs.command(data_dir, workdir, total_steps, f"--config.training.backup_url={url}", *extra)
  return cmd, env


def train(s3: S3Server, data_dir: str, workdir: str, total_steps: int, url: str, *extra: str):
  cmd, env = train_command(s3, data_dir, workdir, total_steps, url, *extra)
  result = subprocess.run(cmd, cwd=train_runs.ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def keys(prefix: str) -> dict[str, int]:
  pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
  return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def verified_steps(url: str, tmp_dir: str) -> list[int]:
  """Steps of the backup whose every file matches the index (downloaded one by one)."""
  for step in backup.backed_up_steps(url):
    assert backup.fetch_checkpoint(url, tmp_dir, str(step)) == step
  return backup.backed_up_steps(url)


@needs_s3fs
def test_backup_resume_on_a_fresh_workdir_matches_the_uninterrupted_run(s3, data_dir, tmp_path):
  url, workdir = f"s3://{BUCKET}/resume", str(tmp_path / "run")
  stdout = train(s3, data_dir, workdir, 8, url)
  assert "backup: step 8 uploaded" in stdout and "every checkpoint is in" in stdout
  expected = train_runs.losses(workdir)
  assert backup.backed_up_steps(url) == [4, 8]
  assert {"resume/run/tokenizer.model", "resume/run/config.json", "resume/run/backup_index.json"} <= set(keys(
      "resume/run/"))

  # One object of the newest step changes after its upload: the resume must notice and use step 4.
  params = {k: n for k, n in keys("resume/checkpoints/8/params/").items() if n > 0 and "METADATA" not in k}
  corrupted = max(params, key=params.get)
  boto3.client("s3").put_object(Bucket=BUCKET, Key=corrupted, Body=b"x" * params[corrupted])
  shutil.rmtree(workdir)

  stdout = train(s3, data_dir, workdir, 8, url)  # no --resume_from: the empty workdir falls back to the backup
  assert f"{corrupted.split('/', 1)[1]} differs from the index" in stdout
  assert "fetched step 4" in stdout and "resumed from" in stdout
  resumed = train_runs.losses(workdir)
  assert sorted(resumed) == [5, 6, 7, 8]
  assert resumed == {s: expected[s] for s in (5, 6, 7, 8)}
  assert not os.path.exists(os.path.join(workdir, backup.FETCH_DIR))
  assert verified_steps(url, str(tmp_path / "check")) == [4, 8]  # the resumed run replaced the corrupt step

  # eval and generate read a checkpoint URL: the same parameters as the workdir's own step 8
  from neon_qtg_jax.inference.restore import load_model  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.parallel import ShardingConfig  # pylint: disable=import-outside-toplevel
  sharding = ShardingConfig.all_fsdp()
  from_url = load_model(str(tmp_path / "elsewhere"), f"{url}/checkpoints/8", sharding=sharding)  # as --checkpoint=URL
  from_workdir = load_model(workdir, 8, sharding=sharding)
  assert from_url.step == 8
  jax.tree.map(np.testing.assert_array_equal, nnx.state(from_url.model, nnx.Param),
               nnx.state(from_workdir.model, nnx.Param))


@needs_s3fs
def test_backup_outage_training_goes_on_and_the_upload_completes(s3, data_dir, tmp_path):
  url, workdir = f"s3://{BUCKET}/outage", str(tmp_path / "run")
  # The 8 steps of the resume test (the same compiled program); a checkpoint and an evaluation every step.
  cmd, env = train_command(s3, data_dir, workdir, 8, url, "--config.training.save_steps=1",
                           "--config.training.eval_steps=1")
  log_path = os.path.join(workdir, "outputs", "logs", "training.log")

  def log_text() -> str:
    return open(log_path, encoding="utf-8").read() if os.path.exists(log_path) else ""

  process = subprocess.Popen(cmd, cwd=train_runs.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=env)
  try:
    train_runs.wait_for(lambda: any("/checkpoints/" in k for k in keys("outage/")), process)
    s3.stop()  # while the first step is being uploaded
    try:  # the store stays down until every step is trained and saved: uploads fail, training goes on
      train_runs.wait_for(lambda: f"backup to {url} failed" in log_text() and "checkpoint 8 saving" in log_text(),
                          process, timeout=120)
    finally:
      s3.start()
    assert process.wait(timeout=180) == 0
  finally:
    if process.poll() is None:
      process.kill()
  text = log_text()
  assert "reachable again" in text and "every checkpoint is in" in text
  local = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert 8 in local
  assert verified_steps(url, str(tmp_path / "check")) == local
  assert {k.split("/")[2] for k in keys("outage/checkpoints/")} == {str(s) for s in local}  # no partial leftovers
  failures = [r["backup/failures"] for r in train_runs.read_jsonl(os.path.join(workdir, "outputs", "logs",
                                                                                "metrics.jsonl"))
              if "backup/failures" in r]
  assert failures and max(failures) > 0
  assert "backup/pending_steps" in train_runs.tensorboard_tags(os.path.join(workdir, "tensorboard"))


@needs_s3fs
def test_backup_index_rejects_partial_and_changed_steps(s3, tmp_path):
  url = f"s3://{BUCKET}/unit"
  steps = {}
  for step in (1, 2, 3):
    step_dir = tmp_path / "local" / str(step)
    (step_dir / "params").mkdir(parents=True)
    (step_dir / "params" / "a").write_bytes(os.urandom(3000 + step))
    (step_dir / "meta").write_text(f'{{"step": {step}}}')
    steps[step] = step_dir
  for step in (1, 2):
    backup.upload_dir(str(steps[step]), backup.location(url) / "checkpoints" / str(step), {"step": step})
  # step 3 stops before its index: files there, no index
  partial = backup.location(url) / "checkpoints" / "3"
  backup.upload_dir(str(steps[3]), partial)
  (partial / backup.INDEX_FILE).unlink()
  assert backup.backed_up_steps(url) == [1, 2]
  with pytest.raises(BackupError, match="incomplete"):
    backup.download_dir(partial, str(tmp_path / "partial"))

  fetched = str(tmp_path / "fetched")
  assert backup.fetch_checkpoint(url, fetched) == 2
  assert (tmp_path / "fetched" / "2" / "params" / "a").read_bytes() == (steps[2] / "params" / "a").read_bytes()
  boto3.client("s3").put_object(Bucket=BUCKET, Key="unit/checkpoints/2/meta", Body=b'{"step": 9}')
  assert backup.fetch_checkpoint(url, str(tmp_path / "again")) == 1
  assert sorted(os.listdir(tmp_path / "again")) == ["1"]  # nothing left of the changed step

  # --resume_from=backup: the backup's steps newest first; the changed step 2 is not fetched, step 1 is.
  checkpointer = Checkpointer(str(tmp_path / "workdir" / "checkpoints"), keep=3)
  plan = resume.plan_resume("backup", checkpointer.directory, url, checkpointer.steps())
  assert [(c.step, c.source) for c in plan.candidates] == [(2, resume.BACKUP), (1, resume.BACKUP)]
  assert not resume.fetch_into(checkpointer, url, 2) and resume.fetch_into(checkpointer, url, 1)
  assert checkpointer.steps() == [1] and sorted(os.listdir(checkpointer.directory)) == ["1"]
  checkpointer.close()
  with pytest.raises(FileNotFoundError, match="no backed-up checkpoint"):
    resume.plan_resume("backup", checkpointer.directory, f"s3://{BUCKET}/empty", [])


def test_backup_uploader_mirrors_the_kept_steps_to_a_directory(tmp_path):
  local, target = tmp_path / "run" / "checkpoints", str(tmp_path / "nfs" / "backup")

  def write_step(step: int, payload: bytes) -> None:
    (local / str(step) / "params").mkdir(parents=True)
    (local / str(step) / "params" / "a").write_bytes(payload)

  def wait_until(predicate) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
      assert time.monotonic() < deadline, "the uploader did not get there in 30 s"
      time.sleep(0.02)

  write_step(2, b"two")
  write_step(6, b"six of an abandoned branch")  # after the resumed step 4: stale, never uploaded
  (tmp_path / "config.json").write_text("{}")
  uploader = BackupUploader(target, str(local), {"config.json": str(tmp_path / "config.json")},
                                   start_step=4, poll_seconds=0.02)
  wait_until(lambda: backup.backed_up_steps(target) == [2])  # newest first: 6 was passed over before 2
  assert backup.backed_up_steps(target) == [2]
  assert os.path.exists(os.path.join(target, "run", "config.json"))

  shutil.rmtree(local / "6")
  write_step(6, b"six written by this run")
  wait_until(lambda: backup.backed_up_steps(target) == [2, 6])
  assert open(os.path.join(target, "checkpoints", "6", "params", "a"), "rb").read() == b"six written by this run"
  shutil.rmtree(local / "2")  # the keep policy deletes a step: so does the backup
  wait_until(lambda: backup.backed_up_steps(target) == [6])
  assert uploader.close(30)
  assert uploader.scalars()["backup/last_step"] == 6 and uploader.scalars()["backup/failures"] == 0


@pytest.mark.parametrize("url, message", [("http://host/x", "scheme http:// is not supported"),
                                          ("s3://", "valid bucket name"), ("s3://Bad_Bucket/x", "valid bucket")])
def test_backup_url_is_validated(url, message):
  config = default_config()
  config.training.backup_url = url
  with pytest.raises(ValueError, match=f"training.backup_url.*{re.escape(message)}"):
    validate(config)
  config.training.backup_url = "/mnt/nfs/runs/x"
  validate(config)
