"""The MQAR sweep: every arm at every number of pairs and width, a few seeds each; its readout and figure.

One JSON per cell (`{arm}_pairs{N}_w{W}_seed{S}.json`) in the sweep directory, written when the cell's run
ends, so a sweep resumes where it stopped and several processes can share one directory (a cell is
claimed with an exclusive lock file, as the study's runs are). The readout per arm and width is the largest
number of pairs solved (held-out accuracy >= recall.SOLVED) on every seed, with every smaller level solved too.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterator

import numpy as np

from neon_qtg_jax.evaluation import recall

# The arms, all in the QTG block except gpt_spec: the geometry (the default), its second-order twin, the
# spec's sphere map, plain dot-product scores, and dot attention without QTG's embedding and filter.
ARMS = ("qtg", "qtg_cosine", "qtg_seed", "qtg_dot", "gpt_spec")


@dataclasses.dataclass(frozen=True)
class Cell:
  arm: str
  pairs: int
  width: int
  seed: int

  @property
  def name(self) -> str:
    return f"{self.arm}_pairs{self.pairs}_w{self.width}_seed{self.seed}"


def cells(arms: tuple[str, ...] = ARMS, pairs: tuple[int, ...] = recall.MQAR_PAIRS,
          widths: tuple[int, ...] = recall.SWEEP_WIDTHS, seeds: tuple[int, ...] = (0, 1, 2)) -> list[Cell]:
  """The sweep's cells, cheapest first (fewest pairs, narrowest), so partial results cover whole levels."""
  return [Cell(a, p, w, s) for p in pairs for w in widths for s in seeds for a in arms]


def _claim(directory: str, cell: Cell) -> bool:
  """True when this process may run the cell: no result yet and no other process holding its lock."""
  if os.path.exists(os.path.join(directory, cell.name + ".json")):
    return False
  try:
    fd = os.open(os.path.join(directory, cell.name + ".lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  os.write(fd, str(os.getpid()).encode())
  os.close(fd)
  return True


def settled_below(records: list[dict[str, Any]], cell: Cell) -> int | None:
  """A smaller pairs level at which the cell's arm and width already failed on a seed (whether or not its other
  seeds have run); None if there is none. That level cannot be solved on every seed, so the readout stops there
  and this cell cannot change it."""
  for pairs in recall.MQAR_PAIRS:
    if pairs >= cell.pairs:
      return None
    runs = [r for r in records if (r["variant"], r["width"], r["num_pairs"]) == (cell.arm, cell.width, pairs)]
    if not all(r["solved"] for r in runs):
      return pairs
  return None


def run(directory: str, todo: list[Cell], steps: int | None = None, every_cell: bool = False,
        progress: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
  """Runs the cells no process has a result or a lock for; yields each record as it is written.

  A cell above a level its arm already failed at that width (on any seed, even while its other seeds run
  elsewhere) is not run unless every_cell: the readout (the largest level solved with every smaller level
  solved) cannot use it.
  A lock left by a killed process stays: remove `*.lock` files of cells without a `.json` to rerun them.
  """
  os.makedirs(directory, exist_ok=True)
  for index, cell in enumerate(todo):
    failed_at = None if every_cell else settled_below(read(directory), cell)
    if failed_at is not None:
      progress(f"cell {index + 1}/{len(todo)}: {cell.name} not run: {cell.arm} at width {cell.width} failed "
               f"{failed_at} pairs")
      continue
    if not _claim(directory, cell):
      continue
    progress(f"cell {index + 1}/{len(todo)}: {cell.name}")
    try:
      preset = dataclasses.replace(recall.mqar_preset(cell.pairs, cell.width), eval_rows=512)
      record = recall.train_and_score("mqar", preset, cell.arm, cell.seed, steps=steps, progress=progress)
      path = os.path.join(directory, cell.name + ".json")
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
      os.replace(path + ".tmp", path)
    finally:
      os.remove(os.path.join(directory, cell.name + ".lock"))
    yield record


def read(directory: str) -> list[dict[str, Any]]:
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "*_pairs*_w*_seed*.json"))):
    with open(path, encoding="utf-8") as f:
      out.append(json.load(f))
  return out


def readout(records: list[dict[str, Any]], seeds: int = 3) -> dict[tuple[str, int], dict[str, Any]]:
  """Per (arm, width): mean accuracy per pairs level, the levels solved on every one of `seeds` seeds, and
  the largest level up to which every level is solved (0: none; None where a level is not complete yet)."""
  out: dict[tuple[str, int], dict[str, Any]] = {}
  for arm in sorted({r["variant"] for r in records}, key=lambda a: ARMS.index(a) if a in ARMS else len(ARMS)):
    for width in sorted({r["width"] for r in records}):
      rows = [r for r in records if r["variant"] == arm and r["width"] == width]
      if not rows:
        continue
      levels: dict[int, list[dict[str, Any]]] = {}
      for r in rows:
        levels.setdefault(r["num_pairs"], []).append(r)
      largest: int | None = 0
      at_least = 0  # the largest level solved so far with every smaller one: a lower bound while incomplete
      for pairs in recall.MQAR_PAIRS:
        runs = levels.get(pairs, [])
        if len(runs) < seeds:
          largest = None if all(r["solved"] for r in runs) else largest
          break
        if not all(r["solved"] for r in runs):
          break
        largest = at_least = pairs
      out[(arm, width)] = {
          "accuracy": {p: float(np.mean([r["accuracy"] for r in runs])) for p, runs in sorted(levels.items())},
          "seeds": {p: len(runs) for p, runs in sorted(levels.items())},
          "solved_every_seed": [p for p, runs in sorted(levels.items())
                                if len(runs) >= seeds and all(r["solved"] for r in runs)],
          "largest_solved": largest,
          "solved_at_least": at_least,
          "floor": {p: float(np.mean([r["no_recall_floor"] for r in runs])) for p, runs in sorted(levels.items())},
      }
  return out


def markdown(summary: dict[tuple[str, int], dict[str, Any]], seeds: int = 3) -> list[str]:
  """The readout table: one row per arm and width, mean held-out accuracy per pairs level (seeds run)."""
  header = "| arm | width | " + " | ".join(f"{p} pairs" for p in recall.MQAR_PAIRS) + \
      " | largest level solved on every seed |"
  lines = [header, "|" + " --- |" * (len(recall.MQAR_PAIRS) + 3)]
  for (arm, width), row in summary.items():
    cells_text = []
    for p in recall.MQAR_PAIRS:
      if p in row["accuracy"]:
        mark = "" if row["seeds"][p] >= seeds else f" ({row['seeds'][p]}/{seeds} seeds)"
        cells_text.append(f"{row['accuracy'][p]:.3f}{mark}")
      else:
        cells_text.append("not run")  # above a level the arm failed (run() skips it), or not yet
    largest = ((f"at least {row['solved_at_least']}" if row["solved_at_least"] else "none so far") + " (not complete)"
               if row["largest_solved"] is None
               else (row["largest_solved"] or "none"))
    lines.append(f"| `{arm}` | {width} | " + " | ".join(cells_text) + f" | {largest} |")
  return lines


def figure(summary: dict[tuple[str, int], dict[str, Any]], path: str) -> str:
  """Zoology's figure: accuracy against pairs, a line per arm, a panel per width; the floor dashed."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  widths = sorted({w for _, w in summary})
  fig, axes = plt.subplots(1, max(len(widths), 1), figsize=(5 * max(len(widths), 1), 3.8), sharey=True,
                           squeeze=False)
  for ax, width in zip(axes[0], widths):
    floor: dict[int, float] = {}
    for (arm, w), row in summary.items():
      if w != width:
        continue
      pairs = sorted(row["accuracy"])
      index = ARMS.index(arm) if arm in ARMS else len(ARMS)
      # One colour and marker per arm in every panel; arms are set slightly apart along x so equal values show.
      ax.plot([p * 2 ** (0.06 * (index - 2)) for p in pairs], [row["accuracy"][p] for p in pairs],
              marker="osD^v*"[index % 6], color=f"C{index}", label=arm)
      floor |= row["floor"]
    if floor:
      ax.plot(sorted(floor), [floor[p] for p in sorted(floor)], "k--", marker="_", markersize=14, linewidth=1,
              label="no-recall floor")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(recall.MQAR_PAIRS), [str(p) for p in recall.MQAR_PAIRS])
    ax.set_xlim(recall.MQAR_PAIRS[0] / 1.4, recall.MQAR_PAIRS[-1] * 1.4)
    ax.set_title(f"MQAR, width {width}")
    ax.set_xlabel("key-value pairs")
    ax.set_ylim(0, 1.02)
    ax.axhline(recall.SOLVED, color="grey", linewidth=0.5)
  axes[0][0].set_ylabel("held-out accuracy (mean over seeds)")
  handles = {}  # every arm of every panel, once
  for ax in axes[0]:
    handles |= dict(zip(*reversed(ax.get_legend_handles_labels())))
  axes[0][-1].legend(handles.values(), handles.keys(), fontsize=8, loc="center right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_tensorboard(summary: dict[tuple[str, int], dict[str, Any]], logdir: str) -> None:
  """recall_sweep/{arm}/width{W}: mean accuracy with the number of pairs as the step (the project's CLU
  TensorBoard writer, which needs no TensorFlow)."""
  from neon_qtg_jax.training.metric_writers import TensorBoardWriter  # pylint: disable=import-outside-toplevel
  for old in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):  # a report replaces the last one's curves
    os.remove(old)
  writer = TensorBoardWriter(logdir)
  for (arm, width), row in summary.items():
    for pairs, acc in row["accuracy"].items():
      writer.write_scalars(pairs, {f"recall_sweep/{arm}/width{width}": acc})
  writer.flush()
  writer.close()


def recall_reading(summary: dict[tuple[str, int], dict[str, Any]], arm: str = "qtg", twin: str = "qtg_cosine",
                   gate: str = "gpt_spec", widths_needed: int = 2) -> str | None:
  """The recall half of the decision rule: "better", "worse" or "no difference" when `arm` solves at least one
  more (fewer) pairs level than `twin` on every seed in at least `widths_needed` widths, counting only levels the
  `gate` arm solves on every seed; None while the cells run so far leave that open.

  A readout not complete yet is a lower bound (`solved_at_least`): `arm` is behind at a width once its own
  readout is final and both `twin` and `gate` have solved a larger level, whatever their remaining cells show.
  """
  widths = sorted({w for _, w in summary})
  ahead = behind = equal = 0
  for width in widths:
    rows = [summary.get((name, width)) for name in (arm, twin, gate)]
    if any(row is None for row in rows):
      continue
    (mine, mine_final), (theirs, theirs_final), (cap, cap_final) = [
        (row["solved_at_least"] if row["largest_solved"] is None else row["largest_solved"],
         row["largest_solved"] is not None) for row in rows]
    if mine_final and theirs > mine and cap > mine:
      behind += 1
    elif theirs_final and mine > theirs and cap > theirs:
      ahead += 1
    elif ((mine_final and theirs_final and min(mine, cap) == min(theirs, cap)
           and (cap_final or cap >= max(mine, theirs)))
          or (cap_final and mine >= cap and theirs >= cap)):  # both past the levels the gate lets count
      equal += 1
  if ahead >= widths_needed:
    return "better"
  if behind >= widths_needed:
    return "worse"
  if len(widths) >= widths_needed and ahead + behind + equal == len(widths):
    return "no difference"
  return None
