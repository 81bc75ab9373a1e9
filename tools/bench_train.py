"""Train-step benchmark: tokens/s and step time of the tiny and a mid-size config, and QTG over GPT.

Each QTG step is timed next to the GPT baseline of equal dimensions (dot-product attention, no
TopoFilter, cross-entropy only) in the same process; the ratio is the cost of QTG.

  python tools/bench_train.py                        # tiny and mid on this machine
  python tools/bench_train.py --steps=20 --output=bench_train.json
  python tools/bench_train.py --configs=tiny         # one of them
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import neon_qtg_jax  # noqa: E402,F401  first: without a GPU driver it keeps jax on the CPU
import jax  # noqa: E402

from neon_qtg_jax.config import default_config, validate  # noqa: E402
from neon_qtg_jax.training.benchmark import compare_with_gpt  # noqa: E402


def mid_config():
  """Mid-size CPU shape: d=128, 4 layers, 4 heads, 256-token windows, batch 8 (about 3.0M parameters)."""
  c = default_config()
  c.model.update(embed_dim=128, num_layers=4, num_heads=4, max_seq_len=256)
  c.data.update(max_length=256, stride=128)
  c.eval.update(max_length=256, stride=128)
  c.training.batch_size = 8
  return validate(c)


CONFIGS = {"tiny": lambda: validate(default_config()), "mid": mid_config}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="tiny,mid", help="comma-separated: " + ",".join(CONFIGS))
  parser.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
  parser.add_argument("--output", default="", help="also write the results as JSON")
  args = parser.parse_args()

  device = jax.devices()[0]
  print(f"device: {jax.device_count()} x {device.device_kind} ({platform.processor() or platform.machine()})")
  header = f"{'model':<22} {'params':>10} {'tok/step':>9} {'compile s':>9} {'step ms':>9} {'tokens/s':>10}"
  print(header)
  results = []
  for name in args.configs.split(","):
    qtg, gpt = compare_with_gpt(CONFIGS[name](), name, steps=args.steps)
    for timing in (qtg, gpt):
      print(f"{timing.name:<22} {timing.params:>10,} {timing.tokens_per_step:>9,} {timing.compile_seconds:>9.1f} "
            f"{1e3 * timing.step_seconds:>9.1f} {timing.tokens_per_second:>10,.0f}")
    ratio = qtg.step_seconds / gpt.step_seconds
    print(f"{name}: QTG step time / GPT step time = {ratio:.2f}x")
    results.append({"config": name, "qtg": dataclasses.asdict(qtg), "gpt": dataclasses.asdict(gpt),
                     "qtg_over_gpt": ratio})
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump({"device": device.device_kind, "results": results}, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
