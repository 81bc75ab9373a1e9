"""The associative-recall table of the study report, from a directory of `tools/recall.py` results.

Each `*.json` file under the directory (searched recursively) is one run of tools/recall.py with at
least {"variant", "task", "preset", "seed", "accuracy", "chance", "steps", "seconds",
"attention_entropy": [one value per layer]}. The table has one row per task, preset and variant:
accuracy mean (and std) over seeds, chance, steps and seconds (mean over seeds) and the attention
entropy per layer (mean over seeds).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from neon_qtg_jax.study import stats

REQUIRED = ("variant", "task", "preset", "seed", "accuracy", "chance", "steps", "seconds", "attention_entropy")


def read_results(directory: str) -> list[dict[str, Any]]:
  """Every recall result under directory, in file-name order; ValueError naming a bad file and field."""
  if not os.path.isdir(directory):
    raise ValueError(f"--recall_dir={directory}: not a directory")
  results = []
  for path in sorted(glob.glob(os.path.join(directory, "**", "*.json"), recursive=True)):
    try:
      with open(path, encoding="utf-8") as f:
        result = json.load(f)
    except json.JSONDecodeError as err:
      raise ValueError(f"{path}: not JSON ({err})") from err
    if not isinstance(result, dict):
      raise ValueError(f"{path}: a recall result is a JSON object, got {type(result).__name__}")
    missing = [field for field in REQUIRED if field not in result]
    if missing:
      raise ValueError(f"{path}: not a tools/recall.py result: no field {', '.join(repr(m) for m in missing)}")
    for field in ("accuracy", "chance", "steps", "seconds"):
      if not isinstance(result[field], (int, float)) or isinstance(result[field], bool):
        raise ValueError(f"{path}: field '{field}' must be a number, got {result[field]!r}")
    if not isinstance(result["attention_entropy"], list):
      raise ValueError(f"{path}: field 'attention_entropy' must be a list (one value per layer)")
    results.append(result | {"file": os.path.relpath(path, directory)})
  return results


def _mean_per_layer(rows: list[list[Any]]) -> list[float] | None:
  """Mean over seeds of per-layer values (a layer's heads are averaged first when given per head)."""
  per_layer = [[float(np.mean(layer)) for layer in row] for row in rows if row]
  if not per_layer or len({len(r) for r in per_layer}) != 1:
    return None
  return np.mean(per_layer, axis=0).round(3).tolist()


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (task, preset, variant), in the order they first appear sorted by task and preset."""
  keys = sorted({(r["task"], str(r["preset"])) for r in results})
  rows = []
  for task, preset in keys:
    variants = list(dict.fromkeys(r["variant"] for r in results if (r["task"], str(r["preset"])) == (task, preset)))
    for variant in variants:
      mine = sorted((r for r in results if (r["task"], str(r["preset"]), r["variant"]) == (task, preset, variant)),
                    key=lambda r: r["seed"])
      accuracy = stats.mean_std([float(r["accuracy"]) for r in mine])
      chances = sorted({float(r["chance"]) for r in mine})
      rows.append({"task": task, "preset": preset, "variant": variant, "seeds": [r["seed"] for r in mine],
                   "accuracy_mean": accuracy[0], "accuracy_std": accuracy[1],
                   "accuracy_per_seed": [float(r["accuracy"]) for r in mine], "chance": chances,
                   "steps_mean": float(np.mean([r["steps"] for r in mine])),
                   "seconds_mean": float(np.mean([r["seconds"] for r in mine])),
                   "attention_entropy_per_layer": _mean_per_layer([r["attention_entropy"] for r in mine])})
  return rows


def markdown(rows: list[dict[str, Any]], directory: str) -> list[str]:
  if not rows:
    return [f"No recall results in `{directory}`.", ""]
  lines = ["| task | preset | variant | seeds | accuracy | chance | steps | seconds | attention entropy per layer |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    accuracy = (f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}" if len(r["seeds"]) > 1
                else f"{r['accuracy_mean']:.3f}")
    entropy = r["attention_entropy_per_layer"]
    lines.append(f"| {r['task']} | {r['preset']} | `{r['variant']}` | {len(r['seeds'])} | {accuracy} "
                 f"| {' / '.join(f'{c:.3f}' for c in r['chance'])} | {r['steps_mean']:.0f} | {r['seconds_mean']:.0f} "
                 f"| {', '.join(f'L{i} {e:.2f}' for i, e in enumerate(entropy)) if entropy else 'n/a'} |")
  return lines + [""]
