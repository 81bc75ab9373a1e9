"""What a long run needs to be watched: a profile window, per-layer gradient and update sizes, MFU, memory, NVML.

Each is a hook that adds scalars to the log step's record (TensorBoard and metrics.jsonl):

- `Profile`: a JAX profiler trace of training.profile_num_steps steps from training.profile_start_step
  into tensorboard/plugins/profile/ (TensorBoard's profile plugin, xprof, opens it);
- `LayerStats`: grad_norm/{group} and update_ratio/{group} (|update| / |param|) per block and kind
  (attention, mlp, norm) plus the embedding and the final norm, computed inside the jit step
  (train_step.layer_stats) and read with the other metrics of the log step;
- `DeviceStats`: device memory in use and peak where the backend reports it, the host RSS, and on
  NVIDIA GPUs utilization and power through NVML (nvidia-ml-py; absent elsewhere, without error).
MFU and the split of step time into data wait and compute are hooks.Throughput's.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from neon_qtg_jax.training.loop import Hook, Loop, StepContext
from neon_qtg_jax.training.outputs import RunOutputs

log = logging.getLogger("neon_qtg_jax")


class Profile(Hook):
  """A profiler trace of steps start .. start + num - 1 (their numbers as logged), on the writer process.

  The trace starts after step start - 1 finished and stops once step start + num - 1 is done on the
  device, so the window holds whole steps and nothing else of the run.
  """

  def __init__(self, start_step: int, num_steps: int, outputs: RunOutputs):
    self.start_step, self.num_steps, self.outputs = start_step, num_steps, outputs
    self.active = False

  @property
  def enabled(self) -> bool:
    return self.num_steps > 0 and self.outputs.is_writer

  def _begin(self) -> None:
    jax.profiler.start_trace(self.outputs.profile_dir)
    self.active = True
    log.info("profiling steps %d..%d into %s/plugins/profile (tensorboard --logdir %s, Profile tab)",
             self.start_step, self.start_step + self.num_steps - 1, self.outputs.profile_dir, self.outputs.profile_dir)

  def _end(self, state: Any) -> None:
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    log.info("profile of %d step(s) written to %s/plugins/profile", self.num_steps, self.outputs.profile_dir)

  def start(self, loop: Loop) -> None:
    if self.enabled and loop.step == self.start_step - 1:
      self._begin()

  def due(self, ctx: StepContext, scheduled: bool) -> bool:
    return self.enabled and ctx.step in (self.start_step - 1, self.start_step + self.num_steps - 1)

  def run(self, ctx: StepContext, loop: Loop) -> None:
    if ctx.step == self.start_step + self.num_steps - 1 and self.active:
      self._end(ctx.state)
    elif ctx.step == self.start_step - 1 and not self.active:
      self._begin()

  def close(self, loop: Loop) -> None:
    if self.active:  # the run stopped inside the window
      self._end(loop.state)

  def abort(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class LayerStats(Hook):
  """grad_norm/* and update_ratio/* of the log step's last step (train_step.layer_stats names the groups)."""

  def __init__(self, groups: tuple[str, ...]):
    self.groups = groups
    self.latest: Any = None

  def observe(self, ctx: StepContext) -> None:
    self.latest = ctx.metrics["layers"]  # stays on the device until a log step reads it

  def run(self, ctx: StepContext, loop: Loop) -> None:
    layers = jax.device_get(self.latest)
    for kind in ("grad_norm", "update_ratio"):
      ctx.scalars.update({f"{kind}/{group}": float(v) for group, v in zip(self.groups, np.asarray(layers[kind]))})


def _nvml_handles() -> tuple[Any, list[Any]]:
  """pynvml and the NVML handles of this process's GPUs, or (None, []) without an NVIDIA GPU or nvidia-ml-py."""
  if jax.local_devices()[0].platform != "gpu":
    return None, []
  try:
    import pynvml  # pylint: disable=import-outside-toplevel
    pynvml.nvmlInit()
  except Exception:  # noqa: BLE001 - no library, no driver, not NVIDIA: the gpu/* scalars are left out
    return None, []
  visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
  handles = []
  for device in jax.local_devices():
    ordinal = getattr(device, "local_hardware_id", device.id)
    try:
      if visible and ordinal < len(visible) and not visible[ordinal].isdigit():
        handles.append(pynvml.nvmlDeviceGetHandleByUUID(visible[ordinal]))
      else:
        handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(visible[ordinal]) if visible else ordinal))
    except Exception:  # noqa: BLE001 - a device NVML cannot see is left out
      continue
  return pynvml, handles


def nvml_scalars(pynvml: Any, handles: list[Any]) -> dict[str, float]:
  """gpu/utilization_pct (mean and min over this process's GPUs) and gpu/power_w (their sum)."""
  if not handles:
    return {}
  utilization = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
  power = [pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0 for h in handles]  # milliwatts
  return {"gpu/utilization_pct": float(np.mean(utilization)), "gpu/utilization_min_pct": float(min(utilization)),
          "gpu/power_w": float(sum(power))}


def memory_scalars() -> dict[str, float]:
  """Device memory in use and its peak (GiB) where the backend reports it, and the host process's RSS."""
  out = {"memory/host_rss_gib": psutil.Process().memory_info().rss / 2**30}
  stats = jax.local_devices()[0].memory_stats()
  if stats and "bytes_in_use" in stats:
    out["memory/device_gib"] = stats["bytes_in_use"] / 2**30
    out["memory/device_peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
  return out


class DeviceStats(Hook):
  """memory/* and, on NVIDIA GPUs, gpu/* at each log step."""

  def __init__(self):
    self.pynvml, self.handles = None, []

  def start(self, loop: Loop) -> None:
    self.pynvml, self.handles = _nvml_handles()

  def run(self, ctx: StepContext, loop: Loop) -> None:
    ctx.scalars.update(memory_scalars())
    if self.handles:
      try:
        ctx.scalars.update(nvml_scalars(self.pynvml, self.handles))
      except Exception as err:  # noqa: BLE001 - a monitoring read never stops training
        log.warning("NVML read failed (%s); gpu/* scalars are left out from now on", err)
        self.handles = []


def measured_matmul_flops(size: int = 1024, seconds: float = 0.5) -> float:
  """FLOP/s of a float32 (size x size) matmul on the first device: the MFU peak where no data sheet gives one.

  The best of repeated timings over about `seconds` (a busy host lowers it, so MFU reads high then).
  """
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best, deadline = float("inf"), time.perf_counter() + seconds
  while time.perf_counter() < deadline:
    began = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - began)
  return 2 * size**3 / best
