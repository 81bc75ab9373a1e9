"""The watchdog ends a process whose main thread is stuck in a wait: no step for the configured time
(a hung collective), or a stop signal the blocked main thread never acts on. training/watchdog.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.test_train_multiprocess import command, env, free_port, train_losses
from tests.test_train_resume import ROOT, data_dir  # noqa: F401 - data_dir is a fixture

# A process whose main thread blocks in a wait that never ends, after step 5, with the loop's signal handler.
BLOCKED = textwrap.dedent("""
    import logging, sys, threading
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    from neon_qtg_jax.training.preemption import PreemptionFlag
    from neon_qtg_jax.training.watchdog import Watchdog
    with Watchdog(timeout_minutes={timeout_minutes}, stop_grace_seconds={grace}, who="process 0 of 1") as dog:
      dog.started(0)
      dog.beat(5)
      with PreemptionFlag():
        {phase}
        print("blocked", flush=True)
        threading.Event().wait()
""")


def run_blocked(timeout_minutes: float, grace: float, send: int | None = None,
                phase: str = "pass") -> tuple[int, str, float]:
  script = BLOCKED.format(timeout_minutes=timeout_minutes, grace=grace, phase=phase)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "blocked"
  started = time.monotonic()
  if send is not None:
    proc.send_signal(send)
  try:
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  return proc.returncode, err, time.monotonic() - started


def test_no_step_within_the_timeout_exits_3_naming_the_step():
  code, err, seconds = run_blocked(timeout_minutes=0.05, grace=60)
  assert code == 3, err
  assert "watchdog: process 0 of 1: no progress for 0.1 min while stalled after step 5" in err
  assert "training.collective_timeout_minutes=0.05" in err
  assert "threading.Event().wait()" not in err or "wait" in err  # the main thread's stack is logged
  assert 'File "<string>"' in err
  assert seconds < 30


def test_sigterm_while_blocked_exits_within_the_grace_without_a_save():
  code, err, seconds = run_blocked(timeout_minutes=30, grace=1, send=signal.SIGTERM)
  assert code == 128 + signal.SIGTERM, err
  assert "SIGTERM received while stalled after step 5" in err
  assert "completed no step in the 1 s since (training.stop_grace_seconds=1)" in err
  assert "exiting without a save" in err
  assert seconds < 20


SAVING = textwrap.dedent("""
    import logging, sys, time
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    from neon_qtg_jax.training.preemption import PreemptionFlag
    from neon_qtg_jax.training.watchdog import Watchdog
    with Watchdog(timeout_minutes=30, stop_grace_seconds=1, who="process 0 of 1") as dog:
      dog.started(0)
      dog.beat(5)
      with PreemptionFlag() as flag:
        with dog.phase("saving", awaited_by_stop=True):
          print("saving", flush=True)
          time.sleep(4)
        print("saved", flag.requested, flush=True)
""")


def test_a_save_in_progress_is_not_cut_short_by_the_grace():
  proc = subprocess.Popen([sys.executable, "-c", SAVING], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "saving"
  proc.send_signal(signal.SIGTERM)  # the grace is 1 s, the save 4 s
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0 and "saved True" in out, out + err


def test_two_processes_one_stopped_before_a_collective_the_other_exits_naming_the_stalled_step(
    data_dir, tmp_path):  # noqa: F811
  """Process 1 is frozen (SIGSTOP) mid-run: process 0 waits in the next step's all-reduce until its watchdog
  ends it; process 1, continued, finds its peer gone and exits non-zero too."""
  port = free_port()
  timeout_minutes = 0.5
  mesh = {"parallel.data": 1, "parallel.fsdp": 2, "parallel.tensor": 2}
  extra = ("--config.training.collective_timeout_minutes=0.5", "--config.training.stop_grace_seconds=5",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2")
  procs = [subprocess.Popen(command(data_dir, str(tmp_path), 1000, mesh, *extra, f"--process_id={i}"),
                            cwd=ROOT, env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    deadline = time.monotonic() + 420
    metrics = os.path.join(tmp_path, "outputs", "logs", "metrics.jsonl")
    while not (os.path.exists(metrics) and max(train_losses(str(tmp_path)), default=0) >= 3):
      assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
      assert time.monotonic() < deadline, "timed out waiting for the two-process run"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    out0, err0 = procs[0].communicate(timeout=60 * timeout_minutes + 90)
    waited = time.monotonic() - stopped_at
    procs[1].send_signal(signal.SIGCONT)
    out1, err1 = procs[1].communicate(timeout=60 * timeout_minutes + 120)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGCONT)
        p.kill()
  assert procs[0].returncode == 3, out0 + err0
  reached = max(train_losses(str(tmp_path)))
  lines = [line for line in (out0 + err0).splitlines() if "watchdog: process 0 of 2: no progress" in line]
  assert len(lines) == 1, out0 + err0
  assert "stalled after step" in lines[0] and "training.collective_timeout_minutes=0.5" in lines[0]
  step = int(lines[0].split("stalled after step ")[1].split()[0])
  assert reached - 1 <= step <= reached + 2, (step, reached)
  assert 60 * timeout_minutes <= waited < 60 * timeout_minutes + 60, waited
  assert procs[1].returncode != 0, out1 + err1


def test_a_stop_the_loop_receives_reaches_the_enclosing_study_through_the_watchdog():
  """The nesting of a study's training: the study's flag, the watchdog, the loop's flag. The loop's hooks close
  first (Beat stops the watchdog's thread, then the loop's flag gives its handler back); the watchdog gives
  back the study's handler last, and the study learns of the stop."""
  from neon_qtg_jax.training.preemption import PreemptionFlag
  from neon_qtg_jax.training.watchdog import Watchdog
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionFlag() as study:
    with Watchdog(timeout_minutes=30, stop_grace_seconds=60, who="process 0 of 1", exit=pytest.fail) as dog:
      dog.started(0)
      loop = PreemptionFlag().__enter__()
      signal.raise_signal(signal.SIGTERM)
      dog.beat(1)
      dog.stop_watching()                 # Beat.close
      loop.__exit__(None, None, None)     # StopSignals.close
      assert loop.requested and study.requested and study.signal_name == "SIGTERM"
      assert not dog.stop_requested  # not taken for a signal before the first step
    assert signal.getsignal(signal.SIGTERM) == study._handle  # pylint: disable=protected-access
  assert signal.getsignal(signal.SIGTERM) == before
