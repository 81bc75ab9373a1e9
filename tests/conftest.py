import logging
import os

import pytest

if not os.environ.get("JAX_PLATFORMS"):  # unset or empty: the CPU (the CUDA plugin must not probe for a driver)
  os.environ["JAX_PLATFORMS"] = "cpu"


@pytest.fixture(autouse=True)
def _restore_package_logger():
  """outputs.setup_logging gives the package logger its own handlers and stops propagation to the root
  logger that caplog listens on; undo that after each test so later tests in the worker see their records."""
  logger = logging.getLogger("neon_qtg_jax")
  handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
  yield
  for handler in list(logger.handlers):
    if handler not in handlers:
      logger.removeHandler(handler)
      handler.close()
  logger.propagate, logger.level = propagate, level
