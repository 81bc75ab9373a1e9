"""Pictures of what a trained model does, from its checkpoint and a few validation windows: attention
maps per layer and head, learned gamma per layer and head, the TopoFilter's persistence s_t along a
sequence and its weight distribution per layer, and the embedding norms. PNGs in WORKDIR/analysis and
the same images in the run's TensorBoard (tag analysis/*, at the checkpoint's step).

  python tools/analyze.py --workdir=runs/tiny
  python tools/analyze.py --workdir=runs/study/runs/tiny_stdlib/gpt/seed0 --checkpoint=latest --windows=8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
import numpy as np  # noqa: E402

from neon_qtg_jax.analysis import embedding_norms, layer_traces, normalized_entropy  # noqa: E402
from neon_qtg_jax.data.sources import DataError  # noqa: E402


def _save(fig, path: str) -> np.ndarray:
  """Writes the PNG and returns the figure as an (H, W, 3) uint8 image for TensorBoard."""
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return image


def plot_attention(attention: np.ndarray, title: str, path: str, max_len: int = 64) -> np.ndarray:
  """attention (layers, H, L, L) of one window: one map per layer (rows) and head (columns)."""
  layers, heads = attention.shape[:2]
  fig, axes = plt.subplots(layers, heads, figsize=(2.2 * heads, 2.2 * layers), squeeze=False)
  for i in range(layers):
    for j in range(heads):
      ax = axes[i, j]
      ax.imshow(attention[i, j, :max_len, :max_len], cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0))
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(f"head {j}", fontsize=8)
      if j == 0:
        ax.set_ylabel(f"layer {i}", fontsize=8)
  fig.suptitle(f"{title}: attention weights (query rows, key columns; first {max_len} tokens; "
               "square-root colour scale)", fontsize=9)
  return _save(fig, path)


def plot_gamma(gamma: np.ndarray, path: str) -> np.ndarray:
  fig, ax = plt.subplots(figsize=(1.2 * gamma.shape[1] + 2, 0.6 * gamma.shape[0] + 1.5))
  im = ax.imshow(gamma, cmap="magma")
  for (i, j), value in np.ndenumerate(gamma):
    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < gamma.mean() else "black",
            fontsize=8)
  ax.set_xticks(range(gamma.shape[1]))
  ax.set_yticks(range(gamma.shape[0]))
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  ax.set_title("learned Fisher-Rao gamma", fontsize=9)
  fig.colorbar(im, ax=ax)
  return _save(fig, path)


def plot_persistence(s: np.ndarray, w: np.ndarray, threshold: float, path: str) -> np.ndarray:
  """s, w (layers, B, L): s_t of the first window per layer, and the histogram of w_t per layer."""
  fig, (ax_s, ax_w) = plt.subplots(1, 2, figsize=(11, 3.8))
  for i in range(s.shape[0]):
    ax_s.plot(s[i, 0], label=f"layer {i}", linewidth=1)
    ax_w.hist(w[i].ravel(), bins=40, range=(0.0, 1.0), histtype="step", label=f"layer {i}")
  ax_s.axhline(threshold, color="gray", linestyle="--", label="persistence_threshold")
  ax_s.set_xlabel("position t")
  ax_s.set_ylabel("s_t")
  ax_s.set_title("TopoFilter persistence along the first window", fontsize=9)
  ax_w.set_xlabel("w_t = exp(-max(s_t - threshold, 0) / tau)")
  ax_w.set_ylabel("tokens")
  ax_w.set_yscale("log")
  ax_w.set_title(f"TopoFilter weights over {w.shape[1]} windows", fontsize=9)
  for ax in (ax_s, ax_w):
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  return _save(fig, path)


def plot_embedding(norms: dict[str, np.ndarray], normalized: bool, path: str) -> np.ndarray:
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  axes[0].hist(norms["token"], bins=50)
  axes[0].set_xlabel("||E[token]||")
  axes[0].set_title("token embedding rows", fontsize=9)
  axes[1].plot(norms["position"])
  axes[1].set_xlabel("position t")
  axes[1].set_ylabel("||P[t]||")
  axes[1].set_title("position embedding rows", fontsize=9)
  axes[2].hist(norms["summed"].ravel(), bins=50)
  axes[2].set_xlabel("||E[tok] + P[t]||")
  after = "then normalised to 1 (amplitude embedding)" if normalized else "used as is (GPT embedding)"
  axes[2].set_title(f"on the validation windows, {after}", fontsize=9)
  for ax in axes:
    ax.grid(alpha=0.3)
  return _save(fig, path)


def analyze(workdir: str, checkpoint: str, windows: int, out_dir: str) -> list[str]:
  from neon_qtg_jax.data import loader  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.inference.restore import load_model  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.training.metric_writers import TensorBoardWriter  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.parallel import ShardingConfig  # pylint: disable=import-outside-toplevel
  restored = load_model(workdir, checkpoint, sharding=ShardingConfig.all_fsdp())
  model, cfg = restored.model, restored.model.cfg
  batch = loader.eval_batches(restored.run_config, "val", num_batches=1, batch_size=windows)[0]
  tokens = np.asarray(batch["inputs"])
  traces = layer_traces(model, tokens)
  from neon_qtg_jax.model import attention as attention_kinds  # pylint: disable=import-outside-toplevel
  kind = attention_kinds.get(cfg.attention).display_name
  title = f"{'/'.join(Path(workdir).resolve().parts[-3:])} step {restored.step}, {kind}"
  os.makedirs(out_dir, exist_ok=True)
  images = {"attention": plot_attention(traces["attention"][:, 0], title, os.path.join(out_dir, "attention.png"))}
  if "gamma" in traces:
    images["gamma"] = plot_gamma(traces["gamma"], os.path.join(out_dir, "gamma.png"))
  if cfg.topofilter:
    images["persistence"] = plot_persistence(traces["s"], traces["w"], cfg.persistence_threshold,
                                             os.path.join(out_dir, "persistence.png"))
  images["embedding"] = plot_embedding(embedding_norms(model, tokens), cfg.amplitude_embedding,
                                       os.path.join(out_dir, "embedding.png"))
  entropy = normalized_entropy(traces["attention"])
  summary = {"checkpoint_step": restored.step, "windows": int(tokens.shape[0]),
             "attention_normalized_entropy": entropy.round(4).tolist(),
             "gamma": traces["gamma"].round(4).tolist() if "gamma" in traces else None,
             "topofilter_mean_weight": traces["w"].mean(axis=(1, 2)).round(4).tolist() if cfg.topofilter else None}
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  print("attention entropy / log(t+1) per layer (heads): "
        + "; ".join(f"L{i}: " + ", ".join(f"{e:.2f}" for e in row) for i, row in enumerate(entropy))
        + " (1: uniform over the prefix)")
  writer = TensorBoardWriter(os.path.join(workdir, "tensorboard"))
  writer.write_images(restored.step, {f"analysis/{name}": image[None] for name, image in images.items()})
  writer.close()
  return [os.path.join(out_dir, f"{name}.png") for name in images]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training run directory")
  p.add_argument("--checkpoint", default="best", help="a step, 'best', 'latest' or a checkpoint path")
  p.add_argument("--windows", type=int, default=8, help="validation windows to analyse (the maps show the first)")
  p.add_argument("--out", default="", help="PNG directory (default WORKDIR/analysis)")
  args = p.parse_args(argv)
  try:
    paths = analyze(args.workdir, args.checkpoint, args.windows, args.out or os.path.join(args.workdir, "analysis"))
  except (FileNotFoundError, DataError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print("wrote " + ", ".join(paths) + f" and TensorBoard images in {os.path.join(args.workdir, 'tensorboard')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
