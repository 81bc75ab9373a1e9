"""README.md's test command is the one CI runs, and it installs what the tests need."""

import os
import re

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_test_command() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  blocks = re.findall(r"```\n(.*?)\n```", text, flags=re.S)
  commands = [b for b in blocks if "-m pytest" in b and "not slow" in b]
  assert len(commands) == 1, commands
  return commands[0].strip()


def test_ci_runs_the_readme_test_command_verbatim():
  command = _readme_test_command()
  assert command.startswith('python3 -m pip install -e ".[test]" && ')
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    lines = [line.strip() for line in f]
  assert command in lines


def test_the_test_extra_pulls_in_every_other_extra():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  extras = project["optional-dependencies"]
  wanted = {f"{project['name']}[{name}]" for name in extras if name != "test"}
  assert set(extras["test"]) == wanted


def test_a_skip_for_a_missing_package_fails_only_where_everything_is_installed(tmp_path):
  import shutil
  import subprocess
  import sys
  shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path)
  (tmp_path / "test_optional.py").write_text(
      "import pytest\n"
      "def test_needs_nothing():\n  pass\n"
      "def test_uses_it():\n"
      "  pytest.importorskip('no_such_package_here', reason='the `no-such` package (extra `x`) is not installed')\n")
  env = {k: v for k, v in os.environ.items() if k != "NEON_QTG_NO_SKIPS"}

  def run(**extra_env):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", str(tmp_path)],
                          cwd=tmp_path, env=env | extra_env, capture_output=True, text=True, timeout=120)

  here = run()
  assert here.returncode == 0 and "1 passed, 1 skipped" in here.stdout, here.stdout + here.stderr
  ci = run(NEON_QTG_NO_SKIPS="1")
  assert ci.returncode == 1 and "test_optional.py" in ci.stdout and "no-such" in ci.stdout, ci.stdout + ci.stderr
