"""Associative recall, the attention test (neon_qtg_jax.evaluation.recall): trains one variant on one
task preset from a seed and scores it on held-out rows; writes a JSON record.

  python tools/recall.py --variant=qtg --task=mqar --preset=small --seed=0 --output=q.json
  python tools/recall.py --variant=gpt --task=induction --preset=hard --seed=1 --output=runs/recall/g.json
  python tools/recall.py --variant=qtg --task=mqar --preset=small --set=model.beta=2.0 --lr=1e-2 --output=x.json

Variants (neon_qtg_jax.model.variants): gpt (standard shape), gpt_spec (the spec's baseline switches),
qtg (the defaults), qtg_seed (the spec's sphere map).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

if not os.path.exists("/proc/driver/nvidia"):  # no GPU driver: skip the CUDA plugin's failing probe
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neon_qtg_jax.config import ConfigError  # noqa: E402
from neon_qtg_jax.evaluation import recall  # noqa: E402
from neon_qtg_jax.model.variants import VARIANTS  # noqa: E402


def parse_set(items: list[str]) -> dict:
  """--set=model.beta=2.0 -> {"model.beta": 2.0}; values parsed as Python literals, else strings."""
  out = {}
  for item in items:
    field, _, text = item.partition("=")
    try:
      out[field] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[field] = text
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
  p.add_argument("--task", required=True, choices=recall.TASKS)
  p.add_argument("--preset", default="small")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
  p.add_argument("--lr", type=float, default=None, help="override the preset's peak learning rate")
  p.add_argument("--set", action="append", default=[], help="a config override FIELD=VALUE (repeatable)")
  p.add_argument("--output", required=True, help="the JSON record")
  args = p.parse_args(argv)
  if args.preset not in recall.PRESETS[args.task]:
    print(f"error: --preset={args.preset!r}: task {args.task} has {sorted(recall.PRESETS[args.task])}",
          file=sys.stderr)
    return 2
  try:
    record = recall.train_and_score(args.task, args.preset, args.variant, args.seed, overrides=parse_set(args.set),
                                    steps=args.steps, lr=args.lr, progress=lambda line: print(line, flush=True))
  except ConfigError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  entropy = ", ".join(f"L{i} {e:.2f}" for i, e in enumerate(record["attention_entropy"]))
  print(f"{args.variant} {args.task}/{args.preset} seed {args.seed}: accuracy {record['accuracy']:.3f} "
        f"(chance {record['chance']:.3f}) after {record['steps']} steps, {record['seconds']:.0f} s; "
        f"attention entropy {entropy}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
