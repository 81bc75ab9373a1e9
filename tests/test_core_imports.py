"""The package's import graph: no module imports one that imports it back, and no package imports one above it.

Imports are read from the source (ast), function-level ones included, so a cycle hidden inside a
function body counts too.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "neon_qtg_jax"

# Bottom to top: a unit may import only units at its own rank or below. A unit is a subpackage or a
# top-level module of neon_qtg_jax.
LAYERS = (
    ("config", "cli"),
    ("ops",),
    ("parallel",),
    ("model", "loss"),
    ("data",),
    ("checkpoint", "info"),
    ("inference",),
    ("training",),
    ("evaluation", "analysis", "serving"),
    ("study",),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_files() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  out = {}
  for root, _, names in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, name)
  return out


def imports_of(module: str, path: str, modules: set[str]) -> set[str]:
  """The package modules `module` imports anywhere in its file (`from pkg import sub` counts as pkg.sub)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:  # a name inside a module: the module itself
        name = name.rsplit(".", 1)[0] if "." in name else ""
      if name and name != module:
        found.add(name)
  return found


def import_graph() -> dict[str, set[str]]:
  files = module_files()
  return {module: imports_of(module, path, set(files)) for module, path in files.items()}


def unit(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in graph.get(node, ()):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        top = stack.pop()
        on_stack.discard(top)
        component.append(top)
        if top == node:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return out


def test_no_module_imports_a_module_that_imports_it_back():
  graph = import_graph()
  assert len(graph) > 50 and "neon_qtg_jax.training.trainer" in graph
  assert cycles(graph) == []


def test_no_package_imports_a_package_above_it():
  graph = import_graph()
  units = {unit(m) for m in graph if m != PACKAGE}
  assert units <= set(RANK), f"place {sorted(units - set(RANK))} in LAYERS"
  upward = sorted((module, imported) for module, targets in graph.items() if module != PACKAGE
                  for imported in targets if imported != PACKAGE and RANK[unit(imported)] > RANK[unit(module)])
  assert upward == []


def test_the_checks_see_a_cycle_and_an_upward_import():
  """The graph reader itself: a planted cycle and a planted upward import are found."""
  graph = {"neon_qtg_jax.a": {"neon_qtg_jax.b"}, "neon_qtg_jax.b": {"neon_qtg_jax.c"},
           "neon_qtg_jax.c": {"neon_qtg_jax.a"}, "neon_qtg_jax.d": set()}
  assert cycles(graph) == [["neon_qtg_jax.a", "neon_qtg_jax.b", "neon_qtg_jax.c"]]
  files = module_files()
  config_imports = imports_of("neon_qtg_jax.config", files["neon_qtg_jax.config"], set(files))
  trainer_imports = imports_of("neon_qtg_jax.training.trainer", files["neon_qtg_jax.training.trainer"], set(files))
  assert "neon_qtg_jax.checkpoint.checkpointer" in trainer_imports and not config_imports
  assert RANK[unit("neon_qtg_jax.training.trainer")] > RANK[unit("neon_qtg_jax.config")]


@pytest.mark.parametrize("module", ["neon_qtg_jax.checkpoint.errors"])
def test_launch_names_its_errors_without_loading_jax(module):
  """launch.py catches the checkpoint errors before any backend starts: their module imports nothing of JAX."""
  files = module_files()
  with open(files[module], encoding="utf-8") as f:
    tree = ast.parse(f.read())
  imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
  imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
  assert not imported & {"jax", "orbax", "flax"}


JAX_ROOTS = ("jax", "jaxlib", "flax", "optax", "orbax")


def _first_module_level_import(path: str, roots: tuple[str, ...]) -> int | None:
  """The line of the first module-level import of a package in roots (None when there is none)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  for node in tree.body:
    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
             else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
    if any(name.split(".")[0] in roots for name in names):
      return node.lineno
  return None


@pytest.mark.skipif(os.path.exists("/proc/driver/nvidia"), reason="this machine has an NVIDIA driver")
def test_without_a_gpu_driver_importing_the_package_keeps_jax_on_the_cpu_without_a_cuda_traceback():
  """With the cuda12 extra installed and no driver, the CUDA plugin's probe prints a long traceback before JAX
  falls back to the CPU; importing neon_qtg_jax first sets JAX_PLATFORMS=cpu (an explicit setting wins)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "import os, neon_qtg_jax, jax; print(os.environ['JAX_PLATFORMS'], jax.devices()[0].platform)"
  done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["cpu", "cpu"] and "Traceback" not in done.stderr
  explicit = subprocess.run([sys.executable, "-c", "import os, neon_qtg_jax; print(os.environ['JAX_PLATFORMS'])"],
                            env=env | {"JAX_PLATFORMS": "cuda"}, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert explicit.stdout.split() == ["cuda"], explicit.stderr


def test_every_entry_point_imports_the_package_before_jax():
  """launch.py and each tool import neon_qtg_jax before jax, so the import above takes effect (or set
  JAX_PLATFORMS themselves, as the CPU-only benchmarks do)."""
  files = [os.path.join(ROOT, "launch.py")] + sorted(
      os.path.join(ROOT, "tools", n) for n in os.listdir(os.path.join(ROOT, "tools")) if n.endswith(".py"))
  late = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      if 'os.environ.setdefault("JAX_PLATFORMS", "cpu")\n' in f.read():
        continue
    first_jax = _first_module_level_import(path, JAX_ROOTS)
    first_package = _first_module_level_import(path, (PACKAGE,))
    if first_jax is not None and (first_package is None or first_package > first_jax):
      late.append(f"{os.path.relpath(path, ROOT)}:{first_jax}")
  assert not late, f"jax imported before neon_qtg_jax: {late}"
