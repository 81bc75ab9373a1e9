"""Per-device memory of the large configs on their meshes: XLA's analysis of the compiled train step
beside --mode=info's analytic estimate, as a markdown table (docs/PERFORMANCE.md).

Without accelerators, forced host devices stand in (the compiled figures are then XLA:CPU's, whose
buffer assignment differs from XLA:GPU's; the estimate column is the device-independent one):

  XLA_FLAGS=--xla_force_host_platform_device_count=64 JAX_PLATFORMS=cpu python tools/memory_table.py
  python tools/memory_table.py --rows=neon_qtg_30b:8 --no_compile        # estimates only

On a GPU cluster, call `memory_table(rows, devices=...)` with the real devices (or jax.devices()).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ and the package of this checkout

from neon_qtg_jax import info, parallel
from neon_qtg_jax.training import memory_test

DEFAULT_ROWS = ("neon_qtg_30b:8", "neon_qtg_100b:64", "neon_qtg_100b:32")
H200_GIB = 141.0  # HBM of one H200; XLA's allocator takes 95% of it under launch.py


def load_config(name: str, num_devices: int):
  config = importlib.import_module(f"configs.{name}").get_config()
  if num_devices != config.info.num_devices:  # the same per-node layout and tokens per step on fewer nodes
    factor = config.info.num_devices // num_devices
    config.parallel.dcn_fsdp = max(1, config.parallel.dcn_fsdp // factor)
    config.training.batch_size //= factor
    config.training.grad_accum_steps *= factor
    config.info.num_devices = num_devices
  return config


def memory_row(name: str, num_devices: int, devices: Sequence[jax.Device] | None, compile_step: bool) -> dict:
  """One table row: the mesh, the analytic estimate and (when compiled) XLA's peak, in GiB per device."""
  config = load_config(name, num_devices)
  params = sum(info.parameter_breakdown(config.model).values())
  estimate = info.training_memory(config, params, num_devices)
  row = {"config": name, "params": params, "devices": num_devices, "mesh": info.mesh_sizes(config, num_devices),
         "rows": f"{config.training.grad_accum_steps} x {config.training.batch_size} x {config.data.max_length}",
         "estimate_gib": estimate["total"] / 2**30, "state_gib": (estimate["total"] - estimate["activations"]) / 2**30}
  if compile_step:
    pool = list(devices if devices is not None else jax.devices())
    if len(pool) < num_devices:
      raise ValueError(f"{name}: needs {num_devices} devices, have {len(pool)} (set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={num_devices} on CPU)")
    mesh = parallel.make_mesh(config.parallel, devices=pool[:num_devices])
    report = memory_test.analyze(config, mesh)
    row.update(compiled_gib=report.peak / 2**30, device_kind=report.device_kind, compile_s=report.compile_seconds)
  return row


def memory_table(rows: Sequence[str] = DEFAULT_ROWS, devices: Sequence[jax.Device] | None = None,
                 compile_step: bool = True) -> str:
  """Markdown table for "config:num_devices" rows, compiling on `devices` (default jax.devices())."""
  lines = ["| config | parameters | devices | mesh (data x fsdp x tensor) | step rows (accum x batch x length) "
           "| state GiB | estimate GiB | compiled peak GiB | H200 headroom |",
           "|---|---|---|---|---|---|---|---|---|"]
  for spec in rows:
    name, count = spec.split(":")
    row = memory_row(name, int(count), devices, compile_step)
    print(f"{spec}: {row}", file=sys.stderr, flush=True)
    mesh = " x ".join(str(v) for v in row["mesh"].values())
    compiled = f"{row['compiled_gib']:.1f} ({row['device_kind']})" if "compiled_gib" in row else "-"
    worst = max(row["estimate_gib"], row.get("compiled_gib", 0.0))
    lines.append(f"| {name} | {row['params']:.3e} | {row['devices']} | {mesh} | {row['rows']} | "
                 f"{row['state_gib']:.1f} | {row['estimate_gib']:.1f} | {compiled} | "
                 f"{1 - worst / (0.95 * H200_GIB * 1e9 / 2**30):.0%} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated config:num_devices")
  parser.add_argument("--no_compile", action="store_true", help="analytic estimates only")
  args = parser.parse_args()
  print(memory_table(args.rows.split(","), compile_step=not args.no_compile))


if __name__ == "__main__":
  main()
