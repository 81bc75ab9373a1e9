"""Why Fisher-Rao attention stays uniform: the sphere statistics and gradient norms of every layer
(neon_qtg_jax.analysis.sphere_statistics, attention_gradient_norms) at initialisation for several
shapes and sphere maps, or of a trained checkpoint. JSON, a PNG and a text table (docs/MODEL.md).

  python tools/diagnose_attention.py --output=runs/diagnosis/init.json
  python tools/diagnose_attention.py --shapes=tiny --maps=seed,normed --betas=1,2,4 --output=runs/diagnosis/b.json
  python tools/diagnose_attention.py --workdir=runs/tiny --checkpoint=latest --output=runs/diagnosis/tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import neon_qtg_jax  # noqa: E402,F401  first: without a GPU driver it keeps jax on the CPU
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from neon_qtg_jax.analysis import attention_gradient_norms, sphere_statistics  # noqa: E402
from neon_qtg_jax.config import apply_overrides, default_config, validate  # noqa: E402
from neon_qtg_jax.loss import LossWeights  # noqa: E402
from neon_qtg_jax.model import QTGModel  # noqa: E402

# Model shapes at initialisation: the tiny config, the study's larger shape, and one block at the 7b
# width (d=3072, 24 heads of 128) on the tiny vocabulary, which fits a CPU.
SHAPES = {
    "tiny": {},
    "larger": {"model.embed_dim": 96, "model.num_layers": 8},
    "7b_block": {"model.embed_dim": 3072, "model.num_heads": 24, "model.num_layers": 1},
}


def _batch(config, windows: int) -> dict[str, jax.Array]:
  from neon_qtg_jax.data import loader  # pylint: disable=import-outside-toplevel
  batch = loader.eval_batches(config, "val", num_batches=1, batch_size=windows)[0]
  return {k: jnp.asarray(v) for k, v in batch.items()}


def diagnose(model: QTGModel, batch: dict[str, jax.Array], config) -> dict:
  return {"sphere": sphere_statistics(model, batch["inputs"]),
          "gradients": attention_gradient_norms(model, batch, LossWeights.from_config(config.training))}


def init_rows(args) -> list[dict]:
  rows = []
  setups = [(sphere_map, beta, w_psi_init)
            for w_psi_init in args.w_psi_inits.split(",") for sphere_map in args.maps.split(",")
            for beta in ([1.0] if sphere_map == "seed" else [float(b) for b in args.betas.split(",")])]
  for shape in args.shapes.split(","):
    for sphere_map, beta, w_psi_init in setups:
      config = default_config()
      config.data.data_dir = args.data_dir
      apply_overrides(config, SHAPES[shape] | {"model.sphere_map": sphere_map, "model.beta": beta,
                                               "model.w_psi_init": w_psi_init}, shape)
      validate(config)
      started = time.perf_counter()
      model = QTGModel(config.model, rngs=nnx.Rngs(args.seed))
      row = {"shape": shape, "sphere_map": sphere_map, "beta": beta, "w_psi_init": w_psi_init,
             "embed_dim": config.model.embed_dim, "head_dim": config.model.embed_dim // config.model.num_heads,
             "gamma": config.model.gamma}
      row |= diagnose(model, _batch(config, args.windows), config)
      print(f"{shape} {sphere_map} beta={beta} W_psi {w_psi_init}: {time.perf_counter() - started:.1f} s",
            file=sys.stderr)
      rows.append(row)
  return rows


def trained_rows(args) -> list[dict]:
  from neon_qtg_jax.inference.restore import load_model  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.parallel import ShardingConfig  # pylint: disable=import-outside-toplevel
  restored = load_model(args.workdir, args.checkpoint, sharding=ShardingConfig.all_fsdp())
  config = restored.run_config
  m = config.model
  row = {"shape": f"trained:{args.workdir}@{restored.step}", "sphere_map": m.sphere_map, "beta": m.beta,
         "w_psi_init": m.w_psi_init, "embed_dim": m.embed_dim, "head_dim": m.embed_dim // m.num_heads,
         "gamma": m.gamma}
  return [row | diagnose(restored.model, _batch(config, args.windows), config)]


def format_table(rows: list[dict]) -> str:
  lines = ["| shape | W_psi init | sphere map | beta | layer | softmax(q) entropy | BC 5/50/95% | gamma D^2 5/50/95% | "
           "score range | attention entropy | grad W_Q | grad W_K | grad gamma_raw |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for row in rows:
    for s, g in zip(row["sphere"], row["gradients"]):
      if "bc_quantiles" not in s:
        continue
      bc = "/".join(f"{v:.4f}" for v in s["bc_quantiles"])
      d2 = "/".join(f"{v:.3f}" for v in s["gamma_d2_quantiles"])
      lines.append(f"| {row['shape']} | {row['w_psi_init']} | {row['sphere_map']} | {row['beta']:g} | {s['layer']} | "
                   f"{s['q_softmax_entropy']:.3f} | {bc} | {d2} | {s['score_range']:.3f} | "
                   f"{s['attention_entropy']:.3f} | {g['grad_w_q']:.2e} | {g['grad_w_k']:.2e} | "
                   f"{g.get('grad_gamma_raw', float('nan')):.2e} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  """Per row (shape, map, beta): the 5-95% band and median of gamma D^2 per layer."""
  fig, ax = plt.subplots(figsize=(10, 0.35 * sum(len(r["sphere"]) for r in rows) + 1.5))
  labels, y = [], 0
  for row in rows:
    for s in row["sphere"]:
      if "gamma_d2_quantiles" not in s:
        continue
      lo, mid, hi = s["gamma_d2_quantiles"]
      ax.plot([lo, hi], [y, y], color="tab:blue", linewidth=3)
      ax.plot([mid], [y], "o", color="black", markersize=3)
      labels.append(f"{row['shape'][:30]} {row['w_psi_init'][:5]} {row['sphere_map']} b={row['beta']:g} L{s['layer']}")
      y += 1
  ax.set_yticks(range(len(labels)))
  ax.set_yticklabels(labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xscale("symlog", linthresh=0.01)
  ax.set_xlabel("gamma_h * arccos(BC)^2 over causal (query, key) pairs: 5-95% band and median")
  ax.set_title("Fisher-Rao scores: how far apart the softmax can see keys", fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="tiny,larger,7b_block", help=f"comma-separated, from {list(SHAPES)}")
  p.add_argument("--maps", default="seed,normed", help="model.sphere_map values")
  p.add_argument("--betas", default="1,2", help="model.beta values for the scaled and normed maps")
  p.add_argument("--w_psi_inits", default="normal,orthogonal", help="model.w_psi_init values")
  p.add_argument("--workdir", default="", help="diagnose this run's checkpoint instead of initialisations")
  p.add_argument("--checkpoint", default="latest")
  p.add_argument("--data_dir", default="data/stdlib", help="prepared data whose validation windows are used")
  p.add_argument("--windows", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default="runs/diagnosis/diagnosis.json")
  args = p.parse_args(argv)
  rows = trained_rows(args) if args.workdir else init_rows(args)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  plot(rows, os.path.splitext(args.output)[0] + ".png")
  table = format_table(rows)
  with open(os.path.splitext(args.output)[0] + ".md", "w", encoding="utf-8") as f:
    f.write(table + "\n")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
