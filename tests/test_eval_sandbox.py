"""The sandbox isolates: hostile programs cannot touch or read files outside their directory, fork or flood threads.

Every probe runs under each isolation this machine offers (bwrap, kernel namespaces); each must be
reported failed and leave the sentinel outside unchanged. The file probes are also run unisolated,
on a throwaway copy, to show they do reach the file when nothing stops them.
"""

import os
import shutil
import stat

import pytest

from neon_qtg_jax.evaluation import sandbox
from neon_qtg_jax.evaluation.sandbox import Limits, SandboxUnavailable, run_program

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
SYSTEM_PROBES = {
    "write system temp dir": "open('/tmp/sandbox-probe.txt', 'w').write('x')",
    "write /usr": "open('/usr/sandbox-probe.txt', 'w').write('x')",
    "write /": "open('/sandbox-probe.txt', 'w').write('x')",
    "read /etc/shadow": "print(open('/etc/shadow').read())",
    "read caller's cwd file": "print(open({secret!r}).read())",
    "read a file in the user's home": "print(open({home_file!r}).read())",
    "read the project": "print(open({project_file!r}).read())",
    "chroot escape": "os.mkdir('x'); os.chroot('x'); os.chroot('../../../..'); print(os.listdir('/'))",
    "fork bomb": "while True:\n  os.fork()",
    "subprocess": "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo escaped > /tmp/sandbox-probe.txt'])",
    "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "thread flood": "import threading, time\nwhile True:\n  threading.Thread(target=time.sleep, args=(60,)).start()",
}
HEADER = "import os, pathlib, shutil\n"
LIMITS = Limits(timeout_s=10.0, memory_bytes=512 << 20)


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


@pytest.mark.parametrize("isolation", sandbox.available_isolation())
def test_no_probe_escapes(isolation, outside):
  before = _snapshot(outside)
  outcomes = {}
  for name, code in {**WRITE_PROBES, **SYSTEM_PROBES}.items():
    outcome = run_program(_fill(code, outside), Limits(timeout_s=10.0, memory_bytes=512 << 20, isolation=isolation))
    outcomes[name] = outcome
    assert outcome.status == "failed", (name, outcome.output)
    assert "s3cr3t-content" not in outcome.output and "root:" not in outcome.output, name
    assert "[project]" not in outcome.output, name
    assert _snapshot(outside) == before, name
    assert outcome.filesystem == isolation
  assert not os.path.exists("/tmp/sandbox-probe.txt")
  report = "\n".join(f"{isolation:>10} | {name:<24} | {o.status} | {o.output.strip().splitlines()[-1][:90]}"
                     for name, o in outcomes.items())
  print("\n" + report)


def test_file_probes_reach_the_file_when_nothing_stops_them(outside, monkeypatch):
  # The control for the test above: unisolated, each write probe really changes the directory.
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


def test_this_machine_isolates():
  # CI installs bubblewrap (.ci/run); a machine where nothing isolates must not pass silently.
  assert sandbox.available_isolation(), "neither bubblewrap nor user namespaces work here"


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
