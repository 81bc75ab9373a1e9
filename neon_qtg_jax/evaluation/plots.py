"""Evaluation results as PNG images (matplotlib, Agg backend)."""

from __future__ import annotations

import math

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_token_losses(edges: np.ndarray, counts: np.ndarray, mean_loss: float, path: str, title: str) -> None:
  """Histogram of per-token losses (nats), with the mean marked."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.stairs(counts, edges, fill=True, color="tab:blue")
  ax.axvline(mean_loss, color="k", linestyle="--", label=f"mean {mean_loss:.3f} (perplexity {math.exp(mean_loss):.2f})")
  ax.set_xlabel("loss per token (nats)")
  ax.set_ylabel("tokens")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_subject_accuracy(per_subject: dict[str, float], chance: float, path: str, title: str) -> None:
  """Horizontal bars of accuracy per subject, sorted, with the chance level marked."""
  plt = _pyplot()
  names = sorted(per_subject, key=per_subject.get)
  fig, ax = plt.subplots(figsize=(8, max(3.0, 0.22 * len(names) + 1.0)))
  ax.barh(range(len(names)), [per_subject[n] for n in names], color="tab:blue")
  ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names], fontsize=7)
  ax.axvline(chance, color="k", linestyle="--", label=f"chance {chance:.2f}")
  ax.set_xlim(0, 1)
  ax.set_xlabel("accuracy")
  ax.set_title(title)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
