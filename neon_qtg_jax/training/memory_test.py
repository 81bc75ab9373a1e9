"""--mode=memory_test: compile the real train step for abstract inputs and report XLA's memory analysis.

Nothing is allocated: the state and batch are ShapeDtypeStructs with their shardings, so this
answers "does the configured step fit on these devices" before any training starts.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
import psutil

from neon_qtg_jax import info, parallel
from neon_qtg_jax.training import train_step as ts


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes per device from XLA's analysis of the compiled step, and the device's capacity."""
  arguments: int
  outputs: int
  aliased: int           # outputs written into donated argument buffers
  temporaries: int
  generated_code: int
  device_bytes: int
  device_kind: str
  num_devices: int
  compile_seconds: float

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @property
  def fits(self) -> bool:
    return self.peak <= self.device_bytes


def device_memory_bytes(device: jax.Device) -> int:
  """Memory one device can hold: the allocator's limit on accelerators, total host RAM on CPU."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return int(psutil.virtual_memory().total)


def abstract_inputs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[ts.TrainState, ts.Batch]:
  """The train step's arguments as sharded ShapeDtypeStructs."""
  shardings = ts.state_shardings(config, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       ts.abstract_train_state(config), shardings)
  t = config.training
  rows = t.batch_size * t.grad_accum_steps
  batch_sharding = parallel.batch_sharding(mesh, config.parallel.rules)
  token = jax.ShapeDtypeStruct((rows, config.data.max_length), jax.numpy.int32, sharding=batch_sharding)
  return state, {"inputs": token, "targets": token}


def analyze(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> MemoryReport:
  """Lowers and compiles the train step for `config` on the current devices; returns the analysis."""
  mesh = mesh or parallel.make_mesh(config.parallel)
  step = ts.make_train_step(config, ts.model_graphdef(config), mesh)
  began = time.perf_counter()
  compiled = step.lower(*abstract_inputs(config, mesh)).compile()
  seconds = time.perf_counter() - began
  analysis = compiled.memory_analysis()
  device = mesh.devices.flat[0]
  return MemoryReport(arguments=analysis.argument_size_in_bytes, outputs=analysis.output_size_in_bytes,
                      aliased=analysis.alias_size_in_bytes, temporaries=analysis.temp_size_in_bytes,
                      generated_code=analysis.generated_code_size_in_bytes, device_bytes=device_memory_bytes(device),
                      device_kind=device.device_kind, num_devices=mesh.size, compile_seconds=seconds)


def _gib(x: float) -> str:
  return f"{x / 2**30:9.3f} GiB"


def format_report(config: ml_collections.ConfigDict, report: MemoryReport) -> str:
  t, m = config.training, config.model
  estimate = info.training_memory(config, sum(info.parameter_breakdown(m).values()), report.num_devices)
  lines = [
      f"memory test: {config.name} train step on {report.num_devices} x {report.device_kind} "
      f"(compiled in {report.compile_seconds:.1f}s)",
      f"  step: {t.grad_accum_steps} x {t.batch_size} x {config.data.max_length} tokens, dtype {m.dtype}, "
      f"remat {m.remat}, scan_layers {m.scan_layers}",
      "  XLA memory analysis, per device:",
      f"    arguments     {_gib(report.arguments)}  (params, optimizer state, batch)",
      f"    outputs       {_gib(report.outputs)}",
      f"    aliased       {_gib(report.aliased)}  (outputs reusing donated arguments)",
      f"    temporaries   {_gib(report.temporaries)}",
      f"    code          {_gib(report.generated_code)}",
      f"    peak          {_gib(report.peak)}  (arguments + outputs - aliased + temporaries + code)",
      f"    device memory {_gib(report.device_bytes)}" + ("  (host RAM: CPU devices)" if "cpu" in
                                                          report.device_kind.lower() else ""),
      f"    info estimate {_gib(estimate['total'])}  (--mode=info's analytic estimate)",
      f"  fits: {'yes' if report.fits else 'NO'} ({report.peak / report.device_bytes:.1%} of device memory)",
  ]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, args: Any) -> int:
  del args
  report = analyze(config)
  print(format_report(config, report), flush=True)
  return 0 if report.fits else 1
