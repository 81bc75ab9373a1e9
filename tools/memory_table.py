"""Per-device memory of the large configs on their meshes: XLA's analysis of the compiled train step
beside --mode=info's analytic estimate, as a markdown table (docs/PERFORMANCE.md).

By default each row compiles for H200s without a GPU (`--target=h200`: XLA's GPU compiler through
the cuda12 extra, parallel/targets). `--target=local` compiles on this process's devices instead
(on a CPU, forced host devices stand in and the figures are XLA:CPU's):

  JAX_PLATFORMS=cpu python tools/memory_table.py --rows=neon_qtg_30b:8,neon_qtg_100b:64
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tools/memory_table.py \
      --rows=neon_qtg_30b:8 --target=local
  python tools/memory_table.py --rows=neon_qtg_30b:8 --no_compile        # estimates only
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ and the package of this checkout

import neon_qtg_jax  # noqa: E402,F401  first: without a GPU driver it keeps jax on the CPU
import jax  # noqa: E402

from neon_qtg_jax import info
from neon_qtg_jax.parallel import targets
from neon_qtg_jax.training import memory_report

DEFAULT_ROWS = ("neon_qtg_30b:8", "neon_qtg_100b:64", "neon_qtg_100b:32")
H200_USABLE_BYTES = 0.95 * info.ACCELERATORS["H200"]["memory"]  # launch.py's allocator fraction of an H200


def load_config(name: str, num_devices: int):
  config = importlib.import_module(f"configs.{name}").get_config()
  if num_devices != config.info.num_devices:  # the same per-node layout and tokens per step on fewer nodes
    factor = config.info.num_devices // num_devices
    config.parallel.dcn_fsdp = max(1, config.parallel.dcn_fsdp // factor)
    config.training.batch_size //= factor
    config.training.grad_accum_steps *= factor
    config.info.num_devices = num_devices
  return config


def row_target(target: str, num_devices: int) -> targets.Target:
  """`num_devices` H200s compiled for without a GPU ("h200"), or the first devices of this process ("local")."""
  if target != "local":
    return targets.compile_target(f"{target}:{num_devices}")
  local = targets.local_target()
  if len(local.devices) < num_devices:
    raise ValueError(f"needs {num_devices} devices, have {len(local.devices)} (on CPU set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={num_devices})")
  return dataclasses.replace(local, devices=local.devices[:num_devices])


def memory_row(name: str, num_devices: int, target: str | None) -> dict:
  """One table row: the mesh, the analytic estimate and (when compiled) XLA's peak, in GiB per device."""
  config = load_config(name, num_devices)
  params = sum(info.parameter_breakdown(config.model).values())
  estimate = info.training_memory(config, params, num_devices)
  row = {"config": name, "params": params, "devices": num_devices, "mesh": info.mesh_sizes(config, num_devices),
         "rows": f"{config.training.grad_accum_steps} x {config.training.batch_size} x {config.data.max_length}",
         "estimate_gib": estimate["total"] / 2**30, "state_gib": (estimate["total"] - estimate["activations"]) / 2**30}
  if target:
    report = memory_report.analyze(config, row_target(target, num_devices))
    row.update(compiled_gib=report.peak / 2**30, device_kind=report.device_kind, compile_s=report.compile_seconds)
  return row


def memory_table(rows: Sequence[str] = DEFAULT_ROWS, target: str | None = "h200") -> str:
  """Markdown table for "config:num_devices" rows, compiled for `target` ("h200", "local"; None: estimates only)."""
  lines = ["| config | parameters | devices | mesh (data x fsdp x tensor) | step rows (accum x batch x length) "
           "| state GiB | estimate GiB | compiled peak GiB | H200 headroom |",
           "|---|---|---|---|---|---|---|---|---|"]
  for spec in rows:
    name, count = spec.split(":")
    row = memory_row(name, int(count), target)
    print(f"{spec}: {row}", file=sys.stderr, flush=True)
    mesh = " x ".join(str(v) for v in row["mesh"].values())
    compiled = f"{row['compiled_gib']:.1f} ({row['device_kind']})" if "compiled_gib" in row else "-"
    worst = max(row["estimate_gib"], row.get("compiled_gib", 0.0))
    lines.append(f"| {name} | {row['params']:.3e} | {row['devices']} | {mesh} | {row['rows']} | "
                 f"{row['state_gib']:.1f} | {row['estimate_gib']:.1f} | {compiled} | "
                 f"{1 - worst * 2**30 / H200_USABLE_BYTES:.0%} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated config:num_devices")
  parser.add_argument("--target", default="h200", help="h200 (compile for H200s without a GPU) or local")
  parser.add_argument("--no_compile", action="store_true", help="analytic estimates only")
  args = parser.parse_args()
  print(memory_table(args.rows.split(","), target=None if args.no_compile else args.target))


if __name__ == "__main__":
  main()
