import contextlib
import logging
import os

import pytest

if not os.environ.get("JAX_PLATFORMS"):  # unset or empty: the CPU (the CUDA plugin must not probe for a driver)
  os.environ["JAX_PLATFORMS"] = "cpu"


@contextlib.contextmanager
def restored_package_logger():
  """trainer.setup_logging gives the package logger its own handlers and stops propagation to the root
  logger that caplog listens on; undo that on exit so later tests in the worker see their records."""
  logger = logging.getLogger("neon_qtg_jax")
  handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
  yield
  for handler in list(logger.handlers):
    if handler not in handlers:
      logger.removeHandler(handler)
      handler.close()
  logger.propagate, logger.level = propagate, level


@pytest.fixture(autouse=True)
def _restore_package_logger():
  """After each test (a fixture of a wider scope that trains in process must use restored_package_logger
  itself: it runs before this one records the state)."""
  with restored_package_logger():
    yield
