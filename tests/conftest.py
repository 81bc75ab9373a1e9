import contextlib
import logging
import os
import sys
import threading

import pytest

if not os.environ.get("JAX_PLATFORMS"):  # unset or empty: the CPU (the CUDA plugin must not probe for a driver)
  os.environ["JAX_PLATFORMS"] = "cpu"

# A test whose optional package is missing is skipped with a reason ending in MISSING; where
# NEON_QTG_NO_SKIPS is set (.ci/run, which installs everything) such a skip fails the run instead.
MISSING = "is not installed"
_skipped_for_a_package: list[str] = []

def _note_skip(report) -> None:
  if report.skipped and MISSING in str(report.longrepr):
    _skipped_for_a_package.append(f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr}")


def pytest_collectreport(report):
  _note_skip(report)


def pytest_runtest_logreport(report):
  _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
  if os.environ.get("NEON_QTG_NO_SKIPS") and _skipped_for_a_package and exitstatus == 0 \
      and not hasattr(session.config, "workerinput"):  # the xdist controller decides
    session.exitstatus = 1
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
      reporter.write_line("NEON_QTG_NO_SKIPS is set and tests were skipped for a missing package:", red=True)
      for line in sorted(set(_skipped_for_a_package)):
        reporter.write_line(f"  {line}", red=True)


@contextlib.contextmanager
def restored_package_logger():
  """outputs.setup_logging gives the package logger its own handlers and stops propagation to the root
  logger that caplog listens on; undo that on exit so later tests in the worker see their records."""
  loggers = [logging.getLogger(name) for name in ("neon_qtg_jax", "absl", "py.warnings", "asyncio")]  # the last two: the
  saved = [(list(x.handlers), x.propagate, x.level) for x in loggers]  # libraries' messages go to training.log
  hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook)  # outputs.setup_logging routes them too
  yield
  sys.excepthook, sys.unraisablehook, threading.excepthook = hooks
  for logger, (handlers, propagate, level) in zip(loggers, saved):
    for handler in list(logger.handlers):
      if handler not in handlers:
        logger.removeHandler(handler)
        handler.close()
    logger.propagate, logger.level = propagate, level
  logging.captureWarnings(False)


@pytest.fixture(autouse=True)
def _restore_package_logger():
  """After each test (a fixture of a wider scope that trains in process must use restored_package_logger
  itself: it runs before this one records the state)."""
  with restored_package_logger():
    yield
