"""Loss curves of a run as a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`; a step logged twice (a resumed run) keeps its last value."""
  by_step = {r["step"]: r[key] for r in records if key in r and "step" in r}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def plot_loss_curves(records: list[dict[str, Any]], path: str, *, unigram_perplexity: float | None = None) -> str:
  """Training and validation cross-entropy and the auxiliary terms against the step; returns path."""
  fig, (ax_ce, ax_aux) = plt.subplots(1, 2, figsize=(11, 4))
  for key, label in (("train/ce", "train CE"), ("val/ce", "validation CE")):
    steps, values = _series(records, key)
    if steps:
      ax_ce.plot(steps, values, label=label, marker="o" if key.startswith("val") else None, markersize=3)
  if unigram_perplexity:
    ax_ce.axhline(math.log(unigram_perplexity), color="gray", linestyle="--",
                  label="unigram CE")
  ax_ce.set_xlabel("step")
  ax_ce.set_ylabel("nats / token")
  ax_ce.legend()
  ax_ce.grid(alpha=0.3)
  for key in ("train/topo", "train/geo", "train/quantum"):
    steps, values = _series(records, key)
    if steps:
      ax_aux.plot(steps, values, label=key.split("/")[1])
  ax_aux.set_xlabel("step")
  ax_aux.set_title("auxiliary loss terms")
  ax_aux.legend()
  ax_aux.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_layer_stats(records: list[dict[str, Any]], path: str) -> str | None:
  """Heatmaps of grad_norm/* and update_ratio/* (log10) per group (rows) against the log step; None without them."""
  groups = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("grad_norm/")})
  if not groups:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(13, max(3.0, 0.22 * len(groups) + 1.5)))
  for ax, kind in zip(axes, ("grad_norm", "update_ratio")):
    steps = sorted({r["step"] for r in records if f"{kind}/{groups[0]}" in r})
    by_step = {r["step"]: r for r in records if f"{kind}/{groups[0]}" in r}
    values = [[math.log10(max(by_step[s].get(f"{kind}/{g}", float("nan")), 1e-30)) for s in steps] for g in groups]
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(groups) - 0.5, -0.5))
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(f"log10 {kind.replace('_', ' ')}")
    fig.colorbar(image, ax=ax)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
