"""CLU MetricWriters for a run: TensorBoard event files (via tensorboardX), metrics.jsonl, training.log.

CLU's own SummaryWriter needs TensorFlow (or torch); tensorboardX writes the same event files
with only protobuf. `clu.metric_writers/__init__` imports the TensorFlow writer unconditionally,
so `_clu_metric_writers()` registers a stand-in for that one submodule before importing CLU.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import types
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)


def _clu_metric_writers() -> types.ModuleType:
  name = "clu.metric_writers.summary_writer"
  try:
    return importlib.import_module("clu.metric_writers")
  except ImportError:
    stand_in = types.ModuleType(name)

    class SummaryWriter:  # pylint: disable=too-few-public-methods
      def __init__(self, *args, **kwargs):
        raise ImportError("clu.metric_writers.SummaryWriter needs TensorFlow; use TensorBoardWriter instead")

    stand_in.SummaryWriter = SummaryWriter
    sys.modules[name] = stand_in
    for module in [m for m in sys.modules if m == "clu.metric_writers" or m.startswith("clu.metric_writers.")]:
      if module != name:
        del sys.modules[module]
    return importlib.import_module("clu.metric_writers")


metric_writers = _clu_metric_writers()
MetricWriter = metric_writers.MetricWriter


def _scalar(value: Any) -> float:
  return float(np.asarray(value))


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files under `logdir` through tensorboardX (no TensorFlow or torch)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._writer = SummaryWriter(logdir=logdir, flush_secs=30)

  def write_summaries(self, step, values, metadata=None):
    for key, value in values.items():
      if np.ndim(value) == 0:
        self._writer.add_scalar(key, _scalar(value), step)
      else:
        self._writer.add_histogram(key, np.asarray(value), step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, _scalar(value), step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    for key, value in images.items():
      self._writer.add_images(key, np.asarray(value), step, dataformats="NHWC")

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    raise NotImplementedError("TensorBoardWriter does not write videos")

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    for key, value in audios.items():
      self._writer.add_audio(key, np.asarray(value)[0, :, 0], step, sample_rate=sample_rate)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, value, step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None):
    for key, value in arrays.items():
      bins = (num_buckets or {}).get(key, "tensorflow")
      self._writer.add_histogram(key, np.asarray(value), step, bins=bins)

  def write_hparams(self, hparams: Mapping[str, Any]):
    text = "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items()))  # indented: markdown code block
    self._writer.add_text("hparams", text, 0)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class JsonlWriter(MetricWriter):
  """Appends one JSON line {"step": s, name: value, ...} per write_scalars call; texts go to their own lines."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def _write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    self.write_scalars(step, {k: v for k, v in values.items() if np.ndim(v) == 0})

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._write({"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}})

  def write_images(self, step, images):
    pass  # images live in TensorBoard and as PNG files

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._write({"step": int(step), "texts": dict(texts)})

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._write({"hparams": {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                             for k, v in hparams.items()}})

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file; a line that does not parse raises naming the file and line."""
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: not a JSON line ({err})") from err
  return records


def create_run_writer(workdir: str) -> MetricWriter:
  """TensorBoard under {workdir}/tensorboard and {workdir}/outputs/logs/metrics.jsonl."""
  return metric_writers.MultiWriter([
      TensorBoardWriter(os.path.join(workdir, "tensorboard")),
      JsonlWriter(os.path.join(workdir, "outputs", "logs", "metrics.jsonl")),
  ])
