"""Compiles every production program of a config for the H200 (or any --target) on a machine without one.

Train step with attention_impl blockwise and pallas (Pallas/Triton kernels built for sm_90), the
GPT baseline's train step (cuDNN fused attention), the eval step, prefill and one decode step;
prints a table of XLA's memory analysis per device and writes it as JSON.

  python tools/h200_compile.py --config=configs/neon_qtg_7b.py --target=h200:1 --output=docs/h200_compile_7b.json
  python tools/h200_compile.py --config=configs/neon_qtg_7b.py --config.inference.weight_dtype=int8 \
      --programs=prefill,decode --output=docs/h200_compile_7b_int8.json

--config.SECTION.FIELD=VALUE sets a config field as launch.py does (prefill and decode store the
parameters as inference.weight_dtype says).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin's compile-only client (parallel/targets)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # as launch.py sets it for training
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neon_qtg_jax import parallel  # noqa: E402
from neon_qtg_jax.config import ConfigError, apply_assignments, validate  # noqa: E402
from neon_qtg_jax.parallel import targets  # noqa: E402
from neon_qtg_jax.training import memory_report, programs  # noqa: E402

INFERENCE_LIMIT_BYTES = 15e9  # the seed plan's figure for sampling the 7b model on one GPU


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/neon_qtg_7b.py", help="config file")
  p.add_argument("--target", default="h200:1", help="NAME:DEVICES (parallel/targets)")
  p.add_argument("--batch", type=int, default=1, help="prefill/decode batch")
  p.add_argument("--context", type=int, default=2048, help="prefill tokens and decode cache slots")
  p.add_argument("--output", default="h200_compile.json", help="where the JSON goes")
  p.add_argument("--programs", default="", help="comma-separated name prefixes to compile (default: all), "
                 "e.g. prefill,decode")
  args, rest = p.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  args.assignments = [a[len("--config."):] for a in rest]
  return args


def load_config(path: str, assignments: list[str] = ()):
  spec = importlib.util.spec_from_file_location("compile_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return validate(apply_assignments(module.get_config(), list(assignments)))


def compile_all(config, target: targets.Target, batch: int, context: int, only: tuple[str, ...] = ()) -> list[dict]:
  sharding = parallel.ShardingConfig.from_config(config.parallel, list(target.devices))
  rows = []
  for name, lower in programs.production_programs(config, sharding, batch=batch, context=context).items():
    if only and not name.startswith(only):
      continue
    print(f"compiling {name} ...", file=sys.stderr, flush=True)
    try:
      r = memory_report.compile_report(lower, target)
    except Exception as err:  # noqa: BLE001 - a program that does not compile is a row of the table
      rows.append({"program": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:400]}"})
      continue
    limit = INFERENCE_LIMIT_BYTES if name.startswith(("prefill", "decode")) else r.device_bytes
    rows.append({"program": name, "peak_bytes": r.peak, "arguments_bytes": r.arguments,
                 "temporaries_bytes": r.temporaries, "limit_bytes": limit, "fits": r.peak <= limit,
                 "compile_seconds": r.compile_seconds})
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| program | peak GiB | arguments GiB | temporaries GiB | limit | fits | compile s |",
           "| --- | ---: | ---: | ---: | --- | --- | ---: |"]
  for row in rows:
    if "error" in row:
      lines.append(f"| {row['program']} | does not compile: {row['error']} | | | | no | |")
      continue
    limit = row["limit_bytes"]
    limit_text = f"{limit / 1e9:.0f} GB" if limit == INFERENCE_LIMIT_BYTES else f"{limit / 2**30:.1f} GiB"
    lines.append(f"| {row['program']} | {row['peak_bytes'] / 2**30:.2f} | {row['arguments_bytes'] / 2**30:.2f} | "
                 f"{row['temporaries_bytes'] / 2**30:.2f} | {limit_text} | {'yes' if row['fits'] else 'NO'} | "
                 f"{row['compile_seconds']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    config = load_config(args.config, args.assignments)
  except ConfigError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  try:
    target = targets.compile_target(args.target)
  except targets.TargetError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  only = tuple(p for p in args.programs.split(",") if p)
  rows = compile_all(config, target, args.batch, args.context, only)
  print(f"{config.name} on {target.name} ({len(target.devices)} x {target.device_kind}, allocator "
        f"{target.device_bytes / 2**30:.1f} GiB of {target.device_memory_bytes / 2**30:.1f} GiB), "
        f"inference weights {config.inference.weight_dtype}, per device:")
  print(table(rows))
  Path(args.output).write_text(json.dumps({"config": config.name, "target": target.name,
                                            "weight_dtype": config.inference.weight_dtype, "programs": rows}, indent=1))
  print(f"wrote {args.output}")
  return 0 if all(row.get("fits") for row in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
