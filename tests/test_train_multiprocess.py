"""Multi-controller training: 2 processes x 2 host devices against 1 process x 4, one writer, SIGTERM, resume.

Every process is a real `launch.py` subprocess joined through jax.distributed (gloo CPU
collectives) on a free port of 127.0.0.1. The learning rate is constant, so losses at a step do
not depend on training.total_steps.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from neon_qtg_jax.training.metric_writers import read_jsonl
from tests.test_train_resume import ROOT, data_dir, overrides  # noqa: F401 - data_dir is a fixture

MESH = {"parallel.data": 1, "parallel.fsdp": 2, "parallel.tensor": 2}  # over 4 devices
TIMEOUT = 420


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict[str, str]:
  out = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    out.pop(name, None)
  return out


def command(data: str, workdir: str, total_steps: int, mesh: dict, *extra: str) -> list[str]:
  values = overrides(data) | {"training.total_steps": total_steps, "training.save_steps": 3} | mesh
  return ["nice", "-n", "5", sys.executable, os.path.join(ROOT, "launch.py"), "--config=configs/neon_qtg_tiny.py",
          "--mode=train", f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in values.items()], *extra]


def train_losses(workdir: str) -> dict[int, float]:
  records = read_jsonl(os.path.join(workdir, "outputs", "logs", "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):  # noqa: F811
  """One process with 4 devices on the (1, 2, 2) mesh, 8 steps uninterrupted."""
  workdir = str(tmp_path_factory.mktemp("one_process"))
  result = subprocess.run(command(data_dir, workdir, 8, MESH), cwd=ROOT, env=env(4), capture_output=True,
                          text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "mesh data=1 x fsdp=2 x tensor=2 over 4 devices in 1 process(es)" in result.stdout
  return train_losses(workdir)


def test_distributed_two_processes_match_one_then_sigterm_saves_and_one_process_resumes(
    data_dir, reference, tmp_path):  # noqa: F811
  workdir = str(tmp_path)
  port = free_port()
  procs = [subprocess.Popen(command(data_dir, workdir, 1000, MESH, f"--coordinator_address=127.0.0.1:{port}",
                                    "--num_processes=2", f"--process_id={i}"),
                            cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    deadline = time.monotonic() + TIMEOUT
    metrics = os.path.join(workdir, "outputs", "logs", "metrics.jsonl")
    while not (os.path.exists(metrics) and max(train_losses(workdir), default=0) >= 4):
      assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
      assert time.monotonic() < deadline, "timed out waiting for the two-process run"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one process only: both must save the same step and exit 0
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], outputs
  stdout0, _ = outputs[0]
  assert "mesh data=1 x fsdp=2 x tensor=2 over 4 devices in 2 process(es)" in stdout0
  assert "(a preemption signal to another process)" in stdout0

  two = train_losses(workdir)
  stopped = max(two)
  assert stopped < 8, "stopped too late to compare with the 8-step reference"
  for step in range(1, stopped + 1):
    assert abs(two[step] - reference[step]) < 1e-5, (step, two[step], reference[step])
  # Both processes took part in the same final checkpoint (Orbax writes it once, Grain once per process).
  step_dir = os.path.join(workdir, "checkpoints", str(stopped))
  saved = sorted(name for name in os.listdir(os.path.join(step_dir, "data")) if name.endswith(".json"))
  assert saved == ["process_0-of-2.json", "process_1-of-2.json"]
  # One writer: every log line is process 0's, each step is recorded once, one TensorBoard file.
  with open(os.path.join(workdir, "outputs", "logs", "training.log"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert lines and all("[process 0]" in line for line in lines)
  steps = [r["step"] for r in read_jsonl(os.path.join(workdir, "outputs", "logs", "metrics.jsonl"))
           if "train/loss" in r]
  assert steps == sorted(set(steps))
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1

  # One process with 2 devices and another mesh resumes from that checkpoint: the same next-step loss.
  result = subprocess.run(command(data_dir, workdir, stopped + 1, {"parallel.fsdp": 2, "parallel.tensor": 1}),
                          cwd=ROOT, env=env(2), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"resumed from {workdir}/checkpoints/{stopped}" in result.stdout
  assert "under another process layout" in result.stdout
  resumed = train_losses(workdir)[stopped + 1]
  print(f"2 processes x 2 devices, steps 1..{stopped}: {[two[s] for s in range(1, stopped + 1)]}")
  print(f"1 process x 4 devices,   steps 1..{stopped + 1}: {[reference[s] for s in range(1, stopped + 2)]}")
  print(f"after SIGTERM at step {stopped}, 1 process x 2 devices resumed: step {stopped + 1} loss {resumed}")
  assert abs(resumed - reference[stopped + 1]) < 1e-5, (resumed, reference[stopped + 1])


def test_batch_that_does_not_split_over_the_data_axes_is_a_config_error(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--config=configs/neon_qtg_tiny.py", "--mode=train",
       f"--workdir={tmp_path}", "--config.training.batch_size=6", "--config.parallel.fsdp=4"],
      cwd=ROOT, env=env(4), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "'training.batch_size' = 6: must be divisible by the 4 devices" in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, "outputs"))  # rejected before any work


@pytest.mark.slow  # two more two-process runs: about 2 minutes on 2 busy cores
def test_multiprocess_kill9_then_two_processes_resume_with_the_saved_data_position(data_dir, reference, tmp_path):  # noqa: F811
  workdir = str(tmp_path)

  def start(total_steps: int) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(command(data_dir, workdir, total_steps, MESH, f"--coordinator_address=127.0.0.1:{port}",
                                     "--num_processes=2", f"--process_id={i}"),
                             cwd=ROOT, env=env(2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(2)]

  procs = start(1000)
  try:
    deadline = time.monotonic() + TIMEOUT
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "3")):
      assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
      time.sleep(0.01)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  saved = max(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())
  assert saved < 7
  procs = start(saved + 2)  # the same process layout: each process restores its own Grain position
  assert [p.wait(timeout=TIMEOUT) for p in procs] == [0, 0]
  logged = train_losses(workdir)
  for step in (saved + 1, saved + 2):
    assert abs(logged[step] - reference[step]) < 1e-5, (step, logged[step], reference[step])


def test_distributed_process_group_from_flags_or_environment(monkeypatch):
  from neon_qtg_jax.parallel import distributed
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
               "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.resolve().num_processes == 1  # nothing set: a single process, no initialize
  assert distributed.resolve("10.0.0.1:1234", 4, 3) == distributed.ProcessGroup("10.0.0.1:1234", 4, 3, "flags")
  with pytest.raises(ValueError, match="give all three"):
    distributed.resolve("10.0.0.1:1234", 4, 4)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node0:5000")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "8")
  monkeypatch.setenv("JAX_PROCESS_ID", "5")
  assert distributed.resolve() == distributed.ProcessGroup("node0:5000", 8, 5, "environment")
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  monkeypatch.setenv("SLURM_NTASKS", "8")
  monkeypatch.setenv("SLURM_PROCID", "2")
  group = distributed.resolve()
  assert (group.num_processes, group.process_id, group.source) == (8, 2, "SLURM")
