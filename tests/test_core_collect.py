"""Every test module collects under a `dev`-only install: a test whose optional package is missing skips with the reason.

The child pytest hides every installed distribution outside the dependency closure of the core
package plus its `dev` extra, as pyproject.toml lists them (their modules cannot be imported,
importlib.util.find_spec and importlib.metadata do not see them), which is what
`pip install -e ".[dev]"` alone gives, and collects the whole tests/ tree.
"""

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

packaging_requirements = pytest.importorskip("packaging.requirements", reason="the `packaging` package is not installed")
tomllib = pytest.importorskip("tomllib", reason="tomllib (Python 3.11) is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = "neon-qtg-jax"
KEEP = {"pip", "setuptools", "wheel", PROJECT}  # the installer and the project itself

HIDE = r"""
import importlib.abc, importlib.metadata, re, sys
MODULES, DISTS = set({modules!r}), set({dists!r})
def _norm(name):
  return re.sub(r"[-_.]+", "-", name or "").lower()
class _Hidden(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in MODULES:
      raise ModuleNotFoundError(f"No module named {{name!r}} (not in a dev-only install)", name=name)
    return None
sys.meta_path.insert(0, _Hidden())
import importlib.util
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):  # as for a module that is not there: None, not an error
  if name.split(".")[0] in MODULES:
    return None
  return _find_spec(name, package)
importlib.util.find_spec = find_spec
_distribution, _distributions = importlib.metadata.distribution, importlib.metadata.distributions
def distribution(name):
  if _norm(name) in DISTS:
    raise importlib.metadata.PackageNotFoundError(name)
  return _distribution(name)
def distributions(**kwargs):
  return [d for d in _distributions(**kwargs) if _norm(d.metadata["Name"]) not in DISTS]
importlib.metadata.distribution, importlib.metadata.distributions = distribution, distributions
"""


def norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name or "").lower()


def closure(requirements: list[str]) -> set[str]:
  """Normalized names of the distributions `requirements` need, recursively (through those installed)."""
  seen: dict[str, set[str]] = {}
  todo = [(norm(r.name), set(r.extras)) for r in map(packaging_requirements.Requirement, requirements)]
  while todo:
    name, wanted = todo.pop()
    if name in seen and wanted <= seen[name]:
      continue
    seen[name] = seen.get(name, set()) | wanted
    try:
      requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for text in requires:
      req = packaging_requirements.Requirement(text)
      if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in seen[name] | {""}):
        todo.append((norm(req.name), set(req.extras)))
  return set(seen)


def top_level_modules(dist: importlib.metadata.Distribution) -> set[str]:
  text = dist.read_text("top_level.txt")
  if text:
    return {line.strip() for line in text.splitlines() if line.strip()}
  names = set()
  for f in dist.files or ():
    first = f.parts[0]
    if first.endswith((".dist-info", ".egg-info", ".data")) or first in ("..", "__pycache__"):
      continue
    names.add(first[:-3] if first.endswith(".py") else first.split(".")[0])
  return names


def test_every_test_module_collects_with_only_the_dev_extra(tmp_path):
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:  # not the installed metadata, which may be older
    project = tomllib.load(f)["project"]
  allowed = closure(project["dependencies"] + project["optional-dependencies"]["dev"]) | KEEP
  installed = {norm(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
  hidden = {name for name in installed if name not in allowed}
  kept_modules = set().union(*(top_level_modules(d) for n, d in installed.items() if n in allowed))
  hidden_modules = set().union(*(top_level_modules(installed[n]) for n in hidden)) - kept_modules
  assert "fastapi" in hidden_modules or "fastapi" not in installed  # the check hides what it should
  script = tmp_path / "collect_dev_only.py"
  script.write_text(HIDE.format(modules=sorted(hidden_modules), dists=sorted(hidden)) +
                    "import pytest\nsys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', "
                    f"{os.path.join(ROOT, 'tests')!r}]))\n")
  env = {k: v for k, v in os.environ.items() if k != "NEON_QTG_NO_SKIPS"}  # skips are what this checks
  proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env | {"JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0 and " error" not in out.splitlines()[-1], out[-5000:]
  skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
  assert all("is not installed" in line for line in skipped), skipped  # every skip names what is missing
  if "fastapi" in hidden_modules:
    assert any("test_serve.py" in line for line in skipped), out[-3000:]
