"""Loss curves of the tiny config against a variant with some fields changed, same data and seed.

Shows whether a numerics option (e.g. training.mu_dtype=bfloat16) changes training: both runs
take the same batches (bytes of the Python standard library's sources, vocabulary 256) and the
same initialisation; prints the loss every few steps and writes a PNG and JSON.

  python tools/compare_training.py --set=training.mu_dtype=bfloat16 --steps=300 --output=docs/mu_dtype_curve
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import neon_qtg_jax  # noqa: E402,F401  first: without a GPU driver it keeps jax on the CPU
import jax  # noqa: E402

from neon_qtg_jax import parallel  # noqa: E402
from neon_qtg_jax.config import default_config, validate  # noqa: E402
from neon_qtg_jax.training import train_step as ts  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--set", action="append", default=[], help="SECTION.FIELD=VALUE for the variant (repeatable)")
  p.add_argument("--base", action="append", default=["model.dtype=bfloat16"],
                 help="SECTION.FIELD=VALUE for both runs (default: bf16 compute, as the 7b runs)")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--output", default="compare_training", help="writes OUTPUT.png and OUTPUT.json")
  return p.parse_args(argv)


def apply(config, assignments: list[str]):
  for assignment in assignments:
    key, value = assignment.split("=", 1)
    section, name = key.split(".")
    current = config[section][name]
    config[section][name] = (value == "true" if isinstance(current, bool) else type(current)(value))
  return validate(config)


def byte_batches(config, steps: int) -> list[dict[str, np.ndarray]]:
  """Fixed batches of byte tokens from the standard library's sources."""
  t, length = config.training, config.data.max_length
  text = b"".join(p.read_bytes() for p in sorted(Path(os.path.dirname(json.__file__)).parent.glob("*.py"))[:200])
  data = np.frombuffer(text, np.uint8).astype(np.int32)
  rows = t.batch_size * t.grad_accum_steps
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    starts = rng.integers(0, len(data) - length - 1, rows)
    window = np.stack([data[s:s + length + 1] for s in starts])
    out.append({"inputs": window[:, :-1], "targets": window[:, 1:]})
  return out


def losses(config, batches) -> list[float]:
  sharding = parallel.ShardingConfig.from_config(config.parallel)
  graphdef, state = ts.create_train_state(config, jax.random.PRNGKey(config.seed), sharding)
  step = ts.make_train_step(config, graphdef, sharding)
  out, began = [], time.perf_counter()
  for i, batch in enumerate(batches):
    state, metrics = step(state, batch)
    out.append(float(metrics["loss"]))
    if (i + 1) % 50 == 0:
      rate = (i + 1) / (time.perf_counter() - began)
      print(f"  step {i + 1}/{len(batches)}  loss {out[-1]:.4f}  {rate:.1f} steps/s, "
            f"ETA {(len(batches) - i - 1) / rate:.0f}s", file=sys.stderr, flush=True)
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  base = apply(default_config(), args.base + ["model.vocab_size=256", "training.total_steps=" + str(args.steps)])
  variant = apply(default_config(), args.base + args.set + ["model.vocab_size=256",
                                                            "training.total_steps=" + str(args.steps)])
  batches = byte_batches(base, args.steps)
  curves = {"base": losses(base, batches), "variant": losses(variant, batches)}
  label = ", ".join(args.set) or "(no change)"
  print(f"tiny config, {' '.join(args.base)}; variant: {label}")
  print("| step | loss today | loss variant | difference |\n| ---: | ---: | ---: | ---: |")
  for i in list(range(49, args.steps, 50)) + ([args.steps - 1] if args.steps % 50 else []):
    a, b = curves["base"][i], curves["variant"][i]
    print(f"| {i + 1} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
  tail = max(1, args.steps // 10)
  mean_a, mean_b = np.mean(curves["base"][-tail:]), np.mean(curves["variant"][-tail:])
  print(f"mean loss of the last {tail} steps: today {mean_a:.4f}, variant {mean_b:.4f} ({mean_b - mean_a:+.4f})")
  Path(args.output + ".json").write_text(json.dumps({"base": args.base, "variant": args.set, "losses": curves}))
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(curves["base"], label="today", linewidth=1)
  ax.plot(curves["variant"], label=label, linewidth=1, alpha=0.8)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.output + ".png", dpi=120)
  print(f"wrote {args.output}.png and {args.output}.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
