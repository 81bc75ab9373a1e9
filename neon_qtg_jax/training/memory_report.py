"""--mode=memory_report (also accepted as --mode=memory_test): XLA's memory analysis of the compiled train step.

Nothing is allocated: the state and batch are ShapeDtypeStructs with their shardings (the lowering
is training/programs.py's), so this answers "does the configured step fit on these devices" before
any training starts. With `--target=h200:N` the step compiles for N H200s with XLA's GPU compiler
on any machine (parallel/targets); without it, for the local devices.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import ml_collections

from neon_qtg_jax import info
from neon_qtg_jax.ops import dispatch
from neon_qtg_jax.parallel import ShardingConfig, targets
from neon_qtg_jax.training import programs


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes per device from XLA's analysis of one compiled program, and what the device may hold."""
  arguments: int
  outputs: int
  aliased: int           # outputs written into donated argument buffers
  temporaries: int
  generated_code: int
  device_bytes: int      # what the allocator may hand out: device memory x allocator fraction
  device_memory_bytes: int
  allocator_fraction: float
  device_kind: str
  num_devices: int
  target: str
  compile_seconds: float

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @property
  def fits(self) -> bool:
    return self.peak <= self.device_bytes


def compile_report(lowered_fn: Callable[[], Any], target: targets.Target) -> MemoryReport:
  """Lowers (for the target's platform) and compiles; XLA's memory analysis of the result."""
  began = time.perf_counter()
  with dispatch.target_platform(target.platform):
    compiled = lowered_fn().compile()
  seconds = time.perf_counter() - began
  analysis = compiled.memory_analysis()
  return MemoryReport(arguments=analysis.argument_size_in_bytes, outputs=analysis.output_size_in_bytes,
                      aliased=analysis.alias_size_in_bytes, temporaries=analysis.temp_size_in_bytes,
                      generated_code=analysis.generated_code_size_in_bytes, device_bytes=target.device_bytes,
                      device_memory_bytes=target.device_memory_bytes,
                      allocator_fraction=target.allocator_fraction, device_kind=target.device_kind,
                      num_devices=len(target.devices), target=target.name, compile_seconds=seconds)


def analyze(config: ml_collections.ConfigDict, target: targets.Target | None = None) -> MemoryReport:
  """Compiles the train step for `config` on `target` (default: the local devices); returns the analysis."""
  target = target or targets.local_target()
  sharding = ShardingConfig.from_config(config.parallel, list(target.devices))
  return compile_report(lambda: programs.lower_train_step(config, sharding), target)


def analyze_init(config: ml_collections.ConfigDict, target: targets.Target | None = None) -> MemoryReport:
  """The fresh-start program (parameters and AdamW state built in their shards). A resume runs no
  program: Orbax reads the checkpoint straight into the sharded state."""
  target = target or targets.local_target()
  sharding = ShardingConfig.from_config(config.parallel, list(target.devices))
  return compile_report(lambda: programs.lower_init(config, sharding), target)


def estimate_bytes(config: ml_collections.ConfigDict, num_devices: int) -> float:
  """--mode=info's analytic estimate of the step's peak per device."""
  return info.training_memory(config, sum(info.parameter_breakdown(config.model).values()), num_devices)["total"]


def _gib(x: float) -> str:
  return f"{x / 2**30:9.3f} GiB"


def report_dict(config: ml_collections.ConfigDict, report: MemoryReport, init: MemoryReport) -> dict[str, Any]:
  """Everything --info_format=json prints: bytes per device (GiB = 2**30 bytes)."""
  return {
      "config": config.name, "target": report.target, "device_kind": report.device_kind,
      "num_devices": report.num_devices, "peak_bytes": report.peak, "device_bytes": report.device_bytes,
      "device_memory_bytes": report.device_memory_bytes, "allocator_fraction": report.allocator_fraction,
      "fits": report.fits, "peak_fraction_of_device_memory": report.peak / report.device_memory_bytes,
      "arguments_bytes": report.arguments, "outputs_bytes": report.outputs, "aliased_bytes": report.aliased,
      "temporaries_bytes": report.temporaries, "generated_code_bytes": report.generated_code,
      "init_peak_bytes": init.peak, "estimate_bytes": estimate_bytes(config, report.num_devices),
      "compile_seconds": report.compile_seconds,
  }


def format_report(config: ml_collections.ConfigDict, report: MemoryReport, init: MemoryReport | None = None) -> str:
  t, m = config.training, config.model
  estimate = estimate_bytes(config, report.num_devices)
  host = "  (host RAM: CPU devices)" if "cpu" in report.device_kind.lower() else ""
  lines = [
      f"memory report: {config.name} train step on {report.num_devices} x {report.device_kind} "
      f"(target {report.target}, compiled in {report.compile_seconds:.1f}s)",
      f"  step: {t.grad_accum_steps} x {t.batch_size} x {config.data.max_length} tokens, dtype {m.dtype}, "
      f"remat {m.remat}, scan_layers {m.scan_layers}, AdamW mu {t.mu_dtype}",
      "  XLA memory analysis, per device (1 GiB = 2^30 bytes):",
      f"    arguments     {_gib(report.arguments)}  (params, optimizer state, batch)",
      f"    outputs       {_gib(report.outputs)}",
      f"    aliased       {_gib(report.aliased)}  (outputs reusing donated arguments)",
      f"    temporaries   {_gib(report.temporaries)}",
      f"    code          {_gib(report.generated_code)}",
      f"    peak          {_gib(report.peak)}  (arguments + outputs - aliased + temporaries + code)",
      f"    device memory {_gib(report.device_memory_bytes)}{host}",
      f"    allocator     {_gib(report.device_bytes)}  ({report.allocator_fraction:.0%} of it: "
      "XLA_PYTHON_CLIENT_MEM_FRACTION)",
      f"    info estimate {_gib(estimate)}  (--mode=info's analytic estimate, {estimate / report.peak - 1:+.1%})",
  ]
  if init is not None:
    lines.append(f"    fresh start   {_gib(init.peak)}  (the init program; a resume runs none)")
  lines.append(f"  fits: {'yes' if report.fits else 'NO, does not fit'} ({report.peak / report.device_bytes:.1%} "
               "of the allocator's memory)")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, args: Any) -> int:
  try:
    target = targets.resolve(getattr(args, "target", ""))
  except targets.TargetError as err:
    print(f"error: {err}", flush=True)
    return 2
  report = analyze(config, target)
  init = analyze_init(config, target)
  if args.info_format == "json":
    print(json.dumps(report_dict(config, report, init)), flush=True)
  else:
    print(format_report(config, report, init), flush=True)
  return 0 if report.fits else 1
