"""What a training run writes besides checkpoints, and the one place that makes it a no-op on non-writer processes.

Process 0 (`decisions.is_writer`) writes training.log, TensorBoard and metrics.jsonl, the loss
plot, samples, the profile trace and the backup; every other process gets writers that do nothing
and logs warnings and errors to stderr, prefixed `[process i]`. Nothing else in training/ asks
which process it is.

Under the workdir: outputs/logs/{training.log,metrics.jsonl}, tensorboard/, outputs/samples/,
outputs/plots/.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from typing import Any, Mapping

import jax
import ml_collections
from absl import logging as absl_logging

from neon_qtg_jax.checkpoint import uploader as backup_uploader
from neon_qtg_jax.parallel import decisions
from neon_qtg_jax.training import plots
from neon_qtg_jax.training.metric_writers import MetricWriter, create_run_writer, metric_writers, read_jsonl

log = logging.getLogger("neon_qtg_jax")


def setup_logging(workdir: str, writer: bool) -> str:
  """Console (stdout) and {workdir}/outputs/logs/training.log for every neon_qtg_jax logger; returns the log path.

  Only the writer writes the file; the other processes print warnings and errors to stderr.
  """
  path = os.path.join(workdir, "outputs", "logs", "training.log")
  if writer:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  tag = decisions.process_tag()
  prefix = f"[{tag.replace('_', ' ')}] " if tag else ""
  formatter = logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S")
  for handler in list(log.handlers):
    log.removeHandler(handler)
    handler.close()
  handlers = ((logging.StreamHandler(sys.stdout), logging.FileHandler(path, encoding="utf-8")) if writer
              else (logging.StreamHandler(sys.stderr),))
  for handler in handlers:
    handler.setFormatter(formatter)
    log.addHandler(handler)
  log.setLevel(logging.INFO if writer else logging.WARNING)
  log.propagate = False
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax narrates every save at INFO through absl
  if writer:  # the libraries' warnings and tracebacks (Orbax's, hundreds of lines for a full disk) go to the log
    logging.captureWarnings(True)  # Python warnings too (JAX's), as logger "py.warnings"
    for name in ("absl", "py.warnings", "asyncio"):  # asyncio: "Task exception was never retrieved" after a full disk
      library_logger = logging.getLogger(name)
      for handler in [h for h in library_logger.handlers if getattr(h, "neon_qtg_log", False)]:
        library_logger.removeHandler(handler)
        handler.close()
      library = logging.FileHandler(path, encoding="utf-8")
      library.setFormatter(formatter)
      library.neon_qtg_log = True
      library_logger.addHandler(library)
      library_logger.propagate = False  # not to absl's stderr handler: a failure is one line there (launch.py)
    # Tracebacks that Python itself prints to stderr: exceptions in callbacks from C++ threads (after a full disk,
    # tensorstore's callbacks into Orbax's closed asyncio loop: "Event loop is closed", a few dozen of them) and
    # uncaught exceptions in other threads. The main thread's own errors still reach stderr as before.
    sys.unraisablehook = _log_unraisable
    sys.excepthook = _log_if_not_main_thread
    threading.excepthook = lambda args: _log_if_not_main_thread(args.exc_type, args.exc_value, args.exc_traceback)
  return path


def _log_unraisable(unraisable: Any) -> None:
  """sys.unraisablehook on the writer process: into training.log (logger "absl")."""
  logging.getLogger("absl").error("exception in a callback Python could not raise (%s)",
                                  unraisable.err_msg or "no message",
                                  exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def _log_if_not_main_thread(exc_type: Any, exc_value: Any, exc_traceback: Any) -> None:
  """sys.excepthook / threading.excepthook: another thread's uncaught exception into training.log."""
  if threading.current_thread() is threading.main_thread():
    sys.__excepthook__(exc_type, exc_value, exc_traceback)
  else:
    logging.getLogger("absl").error("uncaught exception in thread %s", threading.current_thread().name,
                                    exc_info=(exc_type, exc_value, exc_traceback))


@dataclasses.dataclass
class RunOutputs:
  """The run's writers; on a non-writer process every method does nothing."""
  workdir: str
  is_writer: bool
  writer: MetricWriter

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, "outputs", "logs", "metrics.jsonl")

  @property
  def plot_path(self) -> str:
    return os.path.join(self.workdir, "outputs", "plots", "loss.png")

  @property
  def profile_dir(self) -> str:
    return os.path.join(self.workdir, "tensorboard")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if scalars:
      self.writer.write_scalars(step, scalars)

  def plot_losses(self, unigram_perplexity: float | None) -> None:
    """outputs/plots/loss.png and layers.png (gradient norms and update ratios per layer) from metrics.jsonl."""
    if self.is_writer:
      self.writer.flush()
      records = read_jsonl(self.metrics_path)
      plots.plot_loss_curves(records, self.plot_path, unigram_perplexity=unigram_perplexity)
      plots.plot_layer_stats(records, os.path.join(os.path.dirname(self.plot_path), "layers.png"))

  def write_samples(self, step: int, header: str, text: str) -> None:
    """outputs/samples/step_XXXXXXX.txt and the TensorBoard text tab."""
    if not self.is_writer:
      return
    path = os.path.join(self.workdir, "outputs", "samples", f"step_{step:07d}.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(f"{header}\n\n{text}\n")
    self.writer.write_texts(step, {"samples": text.replace("\n", "  \n")})

  def start_uploader(self, config: ml_collections.ConfigDict, start_step: int) -> Any:
    """The backup uploader (training.backup_url) on the writer; NoBackup elsewhere or without a URL."""
    if not self.is_writer:
      return backup_uploader.NoBackup()
    return backup_uploader.start_uploader(config, self.workdir, start_step)

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def open_outputs(workdir: str) -> RunOutputs:
  """Logging and metric writers for the run in `workdir`: real on the writer process, no-ops elsewhere."""
  writer = decisions.is_writer()
  setup_logging(workdir, writer)
  return RunOutputs(workdir, writer, create_run_writer(workdir) if writer else metric_writers.MultiWriter([]))


def flat_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{"model.embed_dim": 64, ...}: the hyperparameters TensorBoard shows."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def describe_devices() -> str:
  return f"{jax.device_count()} x {jax.devices()[0].device_kind}"
