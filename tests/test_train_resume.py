"""End-to-end training through launch.py in real subprocesses: kill -9 and resume, SIGTERM, corrupt checkpoints.

The learning rate is constant (warmup 0, end_lr = lr), so a run's losses at a step do not depend
on training.total_steps: a long run can be killed mid-way and compared with a short one.
"""

import email
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest

from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.data import prepare
from neon_qtg_jax.training.metric_writers import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(os.environ)  # plus the compilation cache of the data_dir fixture
LOSS_KEYS = ("train/loss", "train/ce", "train/topo", "train/geo", "train/quantum", "train/grad_norm")


def overrides(data_dir: str) -> dict[str, object]:
  corpus = f"{os.path.dirname(json.__file__)}/*.py,{os.path.dirname(email.__file__)}/*.py"
  return {
      "model.vocab_size": 512, "model.embed_dim": 16, "model.num_layers": 1, "model.num_heads": 2,
      "model.max_seq_len": 32,
      "data.source": "text", "data.paths": corpus, "data.data_dir": data_dir, "data.max_length": 32,
      "data.stride": 16, "data.val_fraction": 0.2, "data.tokenizer_sample_sentences": 5000,
      "eval.max_length": 32, "eval.stride": 16,
      "training.batch_size": 4, "training.lr": 3e-3, "training.end_lr": 3e-3, "training.warmup_steps": 0,
      "training.log_steps": 1, "training.eval_steps": 4, "training.eval_batches": 2, "training.save_steps": 4,
      "training.sample_steps": 1000, "sampling.max_new_tokens": 8,
  }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Prepared data, and a JAX compilation cache shared by this module's runs (same shapes, same programs)."""
  root = tmp_path_factory.mktemp("train_data")
  path = str(root / "data")
  config = default_config()
  for key, value in overrides(path).items():
    section, name = key.split(".")
    config[section][name] = value
  prepare.prepare_dataset(validate(config), progress=False, num_processes=1)
  SUBPROCESS_ENV.update(JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return path


def command(data_dir: str, workdir: str, total_steps: int, *extra: str) -> list[str]:
  flags = [f"--config.{k}={v}" for k, v in overrides(data_dir).items()]
  return [sys.executable, os.path.join(ROOT, "launch.py"), "--config=configs/neon_qtg_tiny.py", "--mode=train",
          f"--workdir={workdir}", f"--config.training.total_steps={total_steps}", *flags, *extra]


def run(data_dir: str, workdir: str, total_steps: int, *extra: str) -> subprocess.CompletedProcess:
  result = subprocess.run(command(data_dir, workdir, total_steps, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=SUBPROCESS_ENV)
  return result


def start(data_dir: str, workdir: str, total_steps: int, *extra: str) -> subprocess.Popen:
  return subprocess.Popen(command(data_dir, workdir, total_steps, *extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV)


def losses(workdir: str, skip_records: int = 0) -> dict[int, tuple[float, ...]]:
  """Step -> logged training losses, from metrics.jsonl records after the first `skip_records`."""
  records = read_jsonl(os.path.join(workdir, "outputs", "logs", "metrics.jsonl"))[skip_records:]
  return {r["step"]: tuple(r[k] for k in LOSS_KEYS) for r in records if "train/loss" in r}


def num_records(workdir: str) -> int:
  return len(read_jsonl(os.path.join(workdir, "outputs", "logs", "metrics.jsonl")))


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240.0) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    assert process.poll() is None, f"training exited early with code {process.returncode}"
    assert time.monotonic() < deadline, "timed out waiting for the training run"
    time.sleep(0.005)


def tensorboard_events(logdir: str):
  """The Event protos of the TFRecord event files of logdir (length, crc, Event proto, crc per record)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  for name in os.listdir(logdir):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      length = struct.unpack("<Q", data[offset:offset + 8])[0]
      yield event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4


def tensorboard_tags(logdir: str) -> set[str]:
  """Summary tags in the event files of logdir."""
  return {value.tag for event in tensorboard_events(logdir) for value in event.summary.value}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted 8-step run: its workdir and logged losses."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = run(data_dir, workdir, 8)
  assert result.returncode == 0, result.stdout + result.stderr
  logged = losses(workdir)
  assert sorted(logged) == list(range(1, 9))
  return workdir, logged, result.stdout


def test_train_reports_validation_and_unigram_perplexity(reference):
  workdir, _, stdout = reference
  assert "unigram perplexity" in stdout and "validation perplexity" in stdout
  assert os.path.exists(os.path.join(workdir, "outputs", "plots", "loss.png"))
  tags = tensorboard_tags(os.path.join(workdir, "tensorboard"))
  assert {"train/loss", "train/ce", "train/topo", "train/geo", "train/quantum", "train/perplexity", "train/lr",
          "train/grad_norm", "train/param_norm", "perf/tokens_per_s", "perf/step_time_s", "perf/data_wait_s",
          "val/loss", "val/perplexity"} <= tags
  assert any(tag.startswith("memory/") for tag in tags)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_kill9_then_resume_logs_the_same_losses_bit_for_bit(data_dir, reference, tmp_path):
  _, expected, _ = reference
  workdir = str(tmp_path)
  process = start(data_dir, workdir, 1000)
  wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "4")), process)
  process.send_signal(signal.SIGKILL)
  assert process.wait(timeout=60) == -signal.SIGKILL
  first = losses(workdir)
  assert all(first[s] == expected[s] for s in range(1, 5))

  seen = num_records(workdir)
  result = run(data_dir, workdir, 8, "--resume_from=4")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "resumed from" in result.stdout
  resumed = losses(workdir, skip_records=seen)
  assert sorted(resumed) == [5, 6, 7, 8]
  assert {s: resumed[s] for s in resumed} == {s: expected[s] for s in (5, 6, 7, 8)}


def test_sigterm_saves_exits_0_and_the_next_run_resumes(data_dir, reference, tmp_path):
  _, expected, _ = reference
  workdir = str(tmp_path)
  process = start(data_dir, workdir, 1000)
  wait_for(lambda: os.path.exists(os.path.join(workdir, "outputs", "logs", "metrics.jsonl"))
           and 2 in losses(workdir), process)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0
  stopped = max(losses(workdir))
  assert str(stopped) in os.listdir(os.path.join(workdir, "checkpoints"))

  seen = num_records(workdir)
  result = run(data_dir, workdir, stopped + 2)  # no --resume_from: the latest checkpoint is found
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"resumed from {os.path.join(workdir, 'checkpoints')}/{stopped}" in result.stdout
  resumed = losses(workdir, skip_records=seen)
  assert sorted(resumed) == [stopped + 1, stopped + 2]
  for step in resumed:
    if step in expected:
      assert resumed[step] == expected[step]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(data_dir, reference, tmp_path):
  reference_dir, expected, _ = reference
  workdir = str(tmp_path)
  subprocess.run(["cp", "-r", os.path.join(reference_dir, "checkpoints"), workdir], check=True)
  for dirpath, _, filenames in os.walk(os.path.join(workdir, "checkpoints", "8", "params")):
    for name in filenames:
      if "metadata" not in name.lower():
        with open(os.path.join(dirpath, name), "wb") as f:
          f.write(b"not a checkpoint")
  result = run(data_dir, workdir, 8)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "/8 is unreadable" in result.stdout and "falling back" in result.stdout
  aside = os.path.join(workdir, "checkpoints", "8.unreadable")
  assert f"moved to {aside}, not deleted" in result.stdout
  assert f"resumed from {os.path.join(workdir, 'checkpoints')}/4" in result.stdout
  assert losses(workdir) == {s: expected[s] for s in (5, 6, 7, 8)}
  # The unreadable step is kept as it was, beside the new step 8 and outside keep-K rotation.
  assert os.path.isdir(os.path.join(aside, "params")) and os.path.isdir(os.path.join(workdir, "checkpoints", "8"))
  assert any(open(os.path.join(d, f), "rb").read() == b"not a checkpoint"
             for d, _, fs in os.walk(os.path.join(aside, "params")) for f in fs)


@pytest.mark.slow  # ~20 s: its learning rate compiles a step of its own
def test_repeated_nonfinite_steps_stop_the_run_with_a_clear_message(data_dir, tmp_path):
  workdir = str(tmp_path)
  result = run(data_dir, workdir, 200, "--config.training.lr=1e30", "--config.training.end_lr=1e30",
               "--config.training.max_consecutive_nonfinite=3", "--config.training.save_steps=1")
  assert result.returncode == 1, result.stdout + result.stderr
  assert "consecutive steps had a non-finite loss or gradient" in result.stdout
  assert "training.max_consecutive_nonfinite=3" in result.stdout
  assert os.listdir(os.path.join(workdir, "checkpoints"))


def _file_size_limit(limit: int):
  """preexec_fn: files over `limit` bytes cannot be written (EFBIG rather than the SIGXFSZ signal)."""
  def apply():
    import resource  # pylint: disable=import-outside-toplevel
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return apply


@pytest.mark.parametrize("on_error", ["stop", pytest.param("continue", marks=pytest.mark.slow)])
def test_a_full_disk_stops_or_continues_training_as_configured(data_dir, tmp_path, on_error):
  # 100 kB per file: logs and plots fit, a checkpoint's parameter files do not. The failure of the
  # asynchronous save is reported at the next log step or save, whichever finds it first.
  workdir = str(tmp_path)
  result = subprocess.run(command(data_dir, workdir, 8, f"--config.training.on_save_error={on_error}"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV,
                          preexec_fn=_file_size_limit(100_000))
  output = result.stdout + result.stderr
  # Which save crosses the limit first depends on how tensorstore batches its writes: usually step 4's, at
  # times step 8's (step 4's files then stayed under 100 kB and the step is intact).
  failed = re.search(r"checkpoint (\d+) could not be written", output)
  assert failed and int(failed.group(1)) in (4, 8) and "File too large" in output, output
  if on_error == "stop":
    assert result.returncode == 2
    # One error line on stderr; Orbax's logged tracebacks (about 340 lines) are in training.log.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {failed.group(0)}"), result.stderr
    assert "stopping (training.on_save_error='stop')" in errors[0]
    assert "[process=0]" not in result.stderr and "OCDBT" not in result.stderr.replace(errors[0], ""), result.stderr
    assert "Traceback" not in result.stderr, result.stderr  # nor a library thread's (sys.unraisablehook)
    with open(os.path.join(workdir, "outputs", "logs", "training.log"), encoding="utf-8") as f:
      assert "[process=0]" in f.read()
  else:
    assert result.returncode == 0, output
    assert "training goes on" in output and sorted(losses(workdir)) == list(range(1, 9))
