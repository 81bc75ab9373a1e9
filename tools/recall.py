"""Associative recall, the attention test (neon_qtg_jax.evaluation.recall): trains one variant on one
task preset from a seed and scores it on held-out rows; writes a JSON record with the chance level and the
no-recall floor of those rows.

  python tools/recall.py --variant=gpt_spec --task=mqar --preset=small --seed=0 --output=g.json
  python tools/recall.py --variant=qtg --task=mqar --preset=pairs16 --width=128 --seed=1 --output=q.json
  python tools/recall.py --variant=qtg --task=mqar --preset=small --tune --grid=1e-3,3e-3,1e-2 --output=t.json
  python tools/recall.py --sweep --out=docs/results/recall_sweep        # every arm x pairs x width x seed
  python tools/recall.py --sweep_report --out=docs/results/recall_sweep  # the table, figure, TensorBoard

--tune scores a learning-rate grid on the tuning rows only (the held-out rows are not generated). --sweep
runs the cells that have no result and no other process's lock, so N copies of the command on one --out
keep N cores busy, and a stopped sweep resumes. Variants (neon_qtg_jax.model.variants): gpt (standard
shape), gpt_spec (dot attention at QTG's shape), qtg (the defaults), qtg_cosine (its second-order twin),
qtg_seed (the spec's sphere map), qtg_dot (dot scores in the QTG block).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neon_qtg_jax.config import ConfigError  # noqa: E402
from neon_qtg_jax.evaluation import recall, recall_sweep  # noqa: E402
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


def floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x)


def ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x)


def sweep_report(out: str, seeds: int) -> int:
  records = recall_sweep.read(out)
  if not records:
    print(f"error: --out={out}: no sweep results", file=sys.stderr)
    return 2
  summary = recall_sweep.readout(records, seeds)
  lines = recall_sweep.markdown(summary, seeds)
  with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  figure = recall_sweep.figure(summary, os.path.join(out, "mqar_sweep.png"))
  recall_sweep.write_tensorboard(summary, os.path.join(out, "tensorboard"))
  print("\n".join(lines))
  print(f"{len(records)} results; figure {figure}; TensorBoard {os.path.join(out, 'tensorboard')}")
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", choices=sorted(VARIANTS))
  p.add_argument("--task", choices=recall.TASKS)
  p.add_argument("--preset", default="small")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--width", type=int, default=None, help="override the preset's residual width (2 x embed_dim)")
  p.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
  p.add_argument("--lr", type=float, default=None, help="override the variant's peak learning rate")
  p.add_argument("--set", action="append", default=[], help="a config override FIELD=VALUE (repeatable)")
  p.add_argument("--output", help="the JSON record")
  p.add_argument("--tune", action="store_true", help="score --grid on the tuning rows; write the choice")
  p.add_argument("--grid", type=floats, default=(1e-3, 3e-3, 1e-2), help="learning rates for --tune")
  p.add_argument("--sweep", action="store_true", help="run the MQAR sweep's missing cells into --out")
  p.add_argument("--sweep_report", action="store_true", help="the sweep's table, figure and TensorBoard")
  p.add_argument("--out", default="docs/results/recall_sweep", help="the sweep's directory")
  p.add_argument("--arms", default=",".join(recall_sweep.ARMS))
  p.add_argument("--pairs", type=ints, default=recall.MQAR_PAIRS)
  p.add_argument("--widths", type=ints, default=recall.SWEEP_WIDTHS)
  p.add_argument("--seeds", type=ints, default=(0, 1, 2))
  p.add_argument("--every_cell", action="store_true",
                 help="also run the cells above a level the arm already failed (the readout does not use them)")
  args = p.parse_args(argv)
  if args.sweep_report:
    return sweep_report(args.out, len(args.seeds))
  if args.sweep:
    arms = tuple(a for a in args.arms.split(",") if a)
    unknown = sorted(set(arms) - set(VARIANTS))
    if unknown:
      print(f"error: --arms: unknown variant(s) {unknown}; known: {sorted(VARIANTS)}", file=sys.stderr)
      return 2
    todo = recall_sweep.cells(arms, args.pairs, args.widths, args.seeds)
    for record in recall_sweep.run(args.out, todo, steps=args.steps,
                                    every_cell=args.every_cell, progress=lambda line: print(line, flush=True)):
      print(f"{record['variant']} pairs {record['num_pairs']} width {record['width']} seed {record['seed']}: "
            f"accuracy {record['accuracy']:.3f} (floor {record['no_recall_floor']:.3f}) in {record['seconds']:.0f} s",
            flush=True)
    return 0
  if not (args.variant and args.task and args.output):
    print("error: --variant, --task and --output are needed (or --sweep / --sweep_report)", file=sys.stderr)
    return 2
  if args.preset not in recall.PRESETS[args.task]:
    print(f"error: --preset={args.preset!r}: task {args.task} has {sorted(recall.PRESETS[args.task])}",
          file=sys.stderr)
    return 2
  preset = recall.PRESETS[args.task][args.preset]
  if args.width is not None:
    preset = dataclasses.replace(preset, width=args.width)
  say = lambda line: print(line, flush=True)  # noqa: E731
  try:
    if args.tune:
      record = recall.tune_lr(args.task, preset, args.variant, args.grid, args.seed, overrides=parse_set(args.set),
                              steps=args.steps, progress=say)
    else:
      record = recall.train_and_score(args.task, preset, args.variant, args.seed, overrides=parse_set(args.set),
                                      steps=args.steps, lr=args.lr, progress=say)
      record["preset"] = args.preset
  except (ConfigError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  if args.tune:
    print(f"{args.variant} {args.task}/{args.preset}: learning rate {record['chosen_lr']:g} of {record['grid']} "
          f"(tuning rows): {record['runs']}")
    return 0
  entropy = ", ".join(f"L{i} {e:.2f}" for i, e in enumerate(record["attention_entropy"]))
  print(f"{args.variant} {args.task}/{args.preset} seed {args.seed}: accuracy {record['accuracy']:.3f} "
        f"(chance {record['chance']:.3f}, no-recall floor {record['no_recall_floor']:.3f}; "
        f"solved: {record['solved']}) after {record['steps']} steps, {record['seconds']:.0f} s; "
        f"attention entropy {entropy}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
