"""One training run per workdir (issue 28, item 2) and a workdir that cannot be written (item 5).

Runs are launch.py subprocesses with test_train_resume's tiny overrides.
"""

import os
import signal
import socket
import subprocess

import pytest

import test_train_resume as train_runs
from test_train_resume import data_dir  # noqa: F401 - fixture
from neon_qtg_jax.training import workdir_lock


def steps_in(workdir: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def start(data_dir, workdir, total_steps, *extra):  # noqa: F811
  return subprocess.Popen(train_runs.command(data_dir, workdir, total_steps, *extra), cwd=train_runs.ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_runs.SUBPROCESS_ENV)


def test_a_second_trainer_on_the_same_workdir_exits_2_and_leaves_the_first_alone(data_dir, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "run")
  first = start(data_dir, workdir, 40)
  try:
    train_runs.wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "4")), first)
    second = train_runs.run(data_dir, workdir, 40, "--config.training.save_steps=1")
    assert first.poll() is None, "the first run ended before the second was refused"
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2, second.stdout + second.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: workdir {workdir} is in use"), second.stderr
    assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0], lines[0]
    out, err = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, out + err
  # The first run's own checkpoints (save_steps 4, keep 3; the second, with save_steps 1, wrote none) ...
  assert steps_in(workdir) == [32, 36, 40], steps_in(workdir)
  assert f"checkpoints [32, 36, 40] in {workdir}/checkpoints" in out
  # ... and one loss series: every step once, in order.
  logged = [r["step"] for r in train_runs.read_jsonl(os.path.join(workdir, "outputs", "logs", "metrics.jsonl"))
            if "train/loss" in r]
  assert logged == list(range(1, 41)), logged


def test_kill_9_leaves_no_stale_lock(data_dir, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "run")
  first = start(data_dir, workdir, 40)
  try:
    train_runs.wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "4")), first)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # the file stays, the lock does not
  again = train_runs.run(data_dir, workdir, 8)
  assert again.returncode == 0, again.stdout + again.stderr


def test_the_lock_in_process(tmp_path):
  held = workdir_lock.acquire(str(tmp_path))
  # A second open of the file is a second lock holder: refused, naming this process.
  fd = os.open(os.path.join(tmp_path, workdir_lock.LOCK_FILE), os.O_RDWR)
  try:
    import fcntl
    with pytest.raises(BlockingIOError):
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  finally:
    os.close(fd)
  assert workdir_lock.acquire(str(tmp_path / "other"), writer=False)._fd is None  # other processes take no lock
  held.release()
  workdir_lock.acquire(str(tmp_path)).release()  # free again


def _read_only_mount(path: str) -> bool:
  """A read-only bind of `path` onto itself (root), or False where this machine allows none."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return True
  return (subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode == 0 and
          subprocess.run(["mount", "-o", "remount,bind,ro", path], capture_output=True).returncode == 0)


def test_a_read_only_workdir_is_one_line_and_exit_2(data_dir, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "readonly")
  os.makedirs(workdir)
  if not _read_only_mount(workdir):
    pytest.skip("no read-only directory can be made here (not root, cannot mount)")
  try:
    result = train_runs.run(data_dir, workdir, 2)
  finally:
    if os.geteuid() == 0:
      subprocess.run(["umount", workdir], capture_output=True)
    else:
      os.chmod(workdir, 0o755)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stdout + result.stderr
  assert len(lines) == 1 and lines[0].startswith(f"error: workdir {workdir} cannot be written"), result.stderr
