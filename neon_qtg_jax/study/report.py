"""study.json from the run records: statistics per variant, the comparison to the baseline, plots,
TensorBoard curves and the Markdown report (docs/RESULTS.md is written from it).

The report: the associative-recall table (tools/recall.py results, when a recall directory is
given), the main result, then per group its learning-rate grid (chosen on the tuning split), the
table of variants, plots, reading, attention entropy and learned per-head scalars per layer; then
the code versions the runs were made with, stale and failed runs, notes, and how to reproduce.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import pathlib
import platform
import shutil
import textwrap
from typing import Any

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

from neon_qtg_jax.study import (  # noqa: E402  pylint: disable=wrong-import-position
    provenance, recall_table, spec, stats)
from neon_qtg_jax.study.runner import Outcome  # noqa: E402  pylint: disable=wrong-import-position

METRICS = ("bits_per_byte", "perplexity", "loss")


def machine() -> dict[str, Any]:
  return {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "cpu_count": os.cpu_count(),
          "code": provenance.code_version()["describe"]}


def _analysis(record: dict[str, Any]) -> dict[str, Any] | None:
  """The run's analysis/summary.json from tools/analyze.py, when it has been made."""
  import json  # pylint: disable=import-outside-toplevel
  path = os.path.join(record["workdir"], "analysis", "summary.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _entropy_per_layer(records: list[dict[str, Any]]) -> list[float] | None:
  """Attention entropy / log(t+1) per layer, mean over heads and seeds: from each run's record (measured
  after scoring), else from tools/analyze.py's summary of runs recorded before records held it."""
  entropies = [np.asarray(r["attention_entropy"]) for r in records if r.get("attention_entropy")]
  if not entropies:
    entropies = [np.asarray(a["attention_normalized_entropy"]) for a in map(_analysis, records) if a]
  return np.mean([e.mean(axis=1) for e in entropies], axis=0).round(3).tolist() if entropies else None


def _scalars_mean(records: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
  """Each learned per-head attention scalar (readout.attention_scalars), (layers, heads) mean over seeds;
  a record from before they were recorded by name gives its gamma."""
  per_name: dict[str, list[np.ndarray]] = collections.defaultdict(list)
  for r in records:
    scalars = r.get("attention_scalars")
    if scalars is None and r.get("gamma") is not None:
      scalars = {"gamma": r["gamma"]}
    for name, value in (scalars or {}).items():
      per_name[name].append(np.asarray(value))
  return {name: np.mean(values, axis=0).round(3).tolist() for name, values in per_name.items()}


def _variant_summary(records: list[dict[str, Any]], baseline: list[dict[str, Any]], baseline_name: str
                     ) -> dict[str, Any]:
  out: dict[str, Any] = {"seeds": [r["seed"] for r in records]}
  for metric in METRICS:
    mean, std = stats.mean_std([r["final"][metric] for r in records])
    out[metric] = {"mean": mean, "std": std}
  first = records[0]
  for field in ("params", "non_embedding_params", "train_flops_per_token", "planned_steps"):
    out[field] = first.get(field)
  for field in ("steps", "tokens", "train_flops"):  # equal for every seed unless a wall-time budget stopped them
    values = [r[field] for r in records]
    out[field] = float(np.mean(values)) if field != "steps" else round(float(np.mean(values)))
    out[f"{field}_range"] = [min(values), max(values)]
  out["stopped_by_clock"] = sum(bool(r.get("stopped_by_clock")) for r in records)
  lrs = sorted({r["config"]["training"]["lr"] for r in records if "config" in r})
  out["lr"] = lrs
  out["train_seconds_mean"] = stats.mean_std([r["train_seconds"] for r in records])[0]
  out["attention_entropy_per_layer"] = _entropy_per_layer(records)
  out["attention_entropy_errors"] = sorted({r["attention_entropy_error"] for r in records
                                            if r.get("attention_entropy_error")})
  out["attention_scalars_mean"] = _scalars_mean(records)
  if first["variant"] != baseline_name:
    pair = _comparison(records + baseline, first["variant"], baseline_name)
    out["vs_baseline_bits_per_byte"] = pair["interval"]
    out["verdict"] = pair["verdict"] if baseline else "baseline not run yet"
  return out


def _comparison(records: list[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
  """`a` against `b` in one group: final bits/byte of each, Welch's interval of a - b and its verdict."""
  bits = {name: [r["final"]["bits_per_byte"] for r in sorted(records, key=lambda r: r["seed"]) if r["variant"] == name]
          for name in (a, b)}
  interval = stats.welch_interval(bits[a], bits[b])
  return {"a": a, "b": b, "bits_per_byte": bits, "interval": interval,
          "verdict": stats.verdict(interval) if bits[a] and bits[b] else "not run yet"}


def lr_grid_summary(study: dict[str, Any], group: dict[str, Any], tuning: list[dict[str, Any]],
                    lr_choices: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
  """The group's lr grid: per variant every value's tuning bits/byte (None: not run yet; "diverged") and
  steps, and the chosen value; None when the group has no grid."""
  grid = spec.lr_grid(study, group)
  if not grid:
    return None
  variants = []
  for variant in group["variants"]:
    by_lr = {r["lr"]: r for r in tuning if r["group"] == group["name"] and r["variant"] == variant["name"]}
    bits = [("diverged" if by_lr[lr]["tune"].get("diverged") else by_lr[lr]["tune"]["bits_per_byte"])
            if lr in by_lr else None for lr in grid]
    choice = lr_choices.get(f"{group['name']}/{variant['name']}")
    variants.append({"name": variant["name"], "label": variant.get("label", variant["name"]),
                     "tune_bits_per_byte": bits, "steps": [by_lr[lr]["steps"] if lr in by_lr else None for lr in grid],
                     "stopped_by_clock": [bool(by_lr[lr].get("stopped_by_clock")) if lr in by_lr else None
                                          for lr in grid],
                     "chosen": choice["chosen"] if choice else None})
  return {"grid": list(grid), "budget": spec.tune_budget(study, group), "seed": spec.tune_seed(study, group),
          "variants": variants}


def lr_from_summary(group: dict[str, Any], lr_choices: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
  """For a group with lr_from: the source group and each variant's learning rate chosen there (None: not yet)."""
  if "lr_from" not in group:
    return None
  chosen = {v["name"]: lr_choices.get(f"{group['lr_from']}/{v['name']}", {}).get("chosen") for v in group["variants"]}
  return {"group": group["lr_from"], "chosen": chosen}


def summarize(study: dict[str, Any], outcome: Outcome) -> list[dict[str, Any]]:
  """Per group and variant: seeds finished, mean and std of each metric, Welch CI against the baseline;
  per group its lr grid."""
  groups = []
  for group in study["groups"]:
    in_group = [r for r in outcome.records if r["group"] == group["name"]]
    baseline = [r for r in in_group if r["variant"] == study["baseline"]]
    variants = []
    for variant in group["variants"]:
      mine = sorted((r for r in in_group if r["variant"] == variant["name"]), key=lambda r: r["seed"])
      seeds = variant.get("seeds", 1)
      entry = {"name": variant["name"], "label": variant.get("label", variant["name"]),
               "seeds_planned": seeds if isinstance(seeds, int) else len(seeds), "seeds_done": len(mine)}
      if mine:
        entry |= _variant_summary(mine, baseline, study["baseline"])
      variants.append(entry)
    groups.append({"name": group["name"], "title": group.get("title", group["name"]), "budget": group["budget"],
                   "overrides": group.get("overrides", {}), "variants": variants,
                   "comparisons": [_comparison(in_group, a, b) for a, b in spec.comparisons(study)
                                   if {a, b} <= {v["name"] for v in group["variants"]}],
                   "lr_grid": lr_grid_summary(study, group, outcome.tuning, outcome.lr_choices),
                   "lr_from": lr_from_summary(group, outcome.lr_choices)})
  return groups


def code_versions(records: list[dict[str, Any]]) -> dict[str, Any]:
  """The code versions that made the reported runs (every attempt), the majority one, and the runs made
  (wholly or partly) by another: {"versions": [{label, describe, runs}], "majority", "flagged": [key]}."""
  counts: collections.Counter = collections.Counter()
  describe: dict[str, str] = {}
  labels_of: dict[str, set[str]] = {}
  for r in records:
    codes = r.get("code_attempts") or ([r["code"]] if r.get("code") else [])
    labels_of[r["key"]] = {provenance.version_label(c) for c in codes} or {"unrecorded"}
    for c in codes:
      describe[provenance.version_label(c)] = c.get("describe", "unknown")
    counts.update(labels_of[r["key"]])
  if not counts:
    return {"versions": [], "majority": None, "flagged": []}
  majority = counts.most_common(1)[0][0]
  return {"versions": [{"label": label, "describe": describe.get(label, "unrecorded"), "runs": n}
                       for label, n in counts.most_common()],
          "majority": majority,
          "flagged": sorted(key for key, labels in labels_of.items() if labels != {majority})}


def _curves(records: list[dict[str, Any]], x: str) -> tuple[np.ndarray, np.ndarray] | None:
  """Seeds' validation curves on their shared evaluation steps: (x values, (seeds, points) val CE)."""
  curves = [r["curve"] for r in records if r["curve"]]
  if not curves:
    return None
  points = min(len(c) for c in curves)
  return (np.asarray([p[x] for p in curves[0][:points]]),
          np.asarray([[p["val_ce"] for p in c[:points]] for c in curves]))


def plot_group(group: dict[str, Any], records: list[dict[str, Any]], out_dir: str, baseline: str) -> list[str]:
  """Two PNGs per group: validation CE against tokens and FLOPs (mean, seed band), and the final comparison."""
  paths = []
  if not any(r["group"] == group["name"] for r in records):
    return paths
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for variant in group["variants"]:
    mine = [r for r in records if r["group"] == group["name"] and r["variant"] == variant["name"]]
    for ax, x, label in ((axes[0], "tokens", "training tokens"), (axes[1], "flops", "training FLOPs")):
      curves = _curves(mine, x)
      if curves is None:
        continue
      xs, ys = curves
      line, = ax.plot(xs, ys.mean(axis=0), label=f"{variant['label']} (n={len(ys)})")
      ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)
      ax.set_xlabel(label)
  for ax in axes:
    ax.set_ylabel("validation CE (nats/token, fixed eval batches)")
    ax.grid(alpha=0.3)
  axes[1].set_xscale("log")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{group['title']}: validation loss (mean over seeds, band: min-max)")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, f"{group['name']}_curves.png"))
  fig.savefig(paths[-1], dpi=80)
  plt.close(fig)

  rows = [v for v in group["variants"] if v.get("seeds_done")]
  if rows:
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    labels, centers, lows, highs = [], [], [], []
    for v in rows:
      labels.append(f"{v['name']} (n={v['seeds_done']})")  # the long labels did not fit beside the bars
      interval = v.get("vs_baseline_bits_per_byte")
      if v["name"] == baseline:
        centers.append(0.0), lows.append(0.0), highs.append(0.0)
      elif interval:
        centers.append(interval["difference"]), lows.append(interval["low"]), highs.append(interval["high"])
      else:
        centers.append(np.nan), lows.append(np.nan), highs.append(np.nan)
    ys = np.arange(len(rows))
    centers_a = np.asarray(centers)
    errors = np.abs(np.asarray([centers_a - np.asarray(lows), np.asarray(highs) - centers_a]))
    ax.barh(ys, centers_a, xerr=errors, color=["gray" if v["name"] == baseline else "tab:blue" for v in rows],
            capsize=4)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bits/byte minus the baseline's (95% Welch CI; < 0 is better)")
    ax.set_title(textwrap.fill(f"{group['title']}: final validation bits/byte against {baseline}", 70), fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{group['name']}_comparison.png"))
    fig.savefig(paths[-1], dpi=80)
    plt.close(fig)
  return paths


def copy_analysis_pictures(study: dict[str, Any], records: list[dict[str, Any]], plot_dir: str) -> list[str]:
  """The analysis PNGs of the first seed of each (group, variant) in study["pictures"], as GROUP__VARIANT_NAME.png."""
  names = []
  for group, variant in study.get("pictures", []):
    mine = sorted((r for r in records if r["group"] == group and r["variant"] == variant), key=lambda r: r["seed"])
    source = os.path.join(mine[0]["workdir"], "analysis") if mine else ""
    for picture in ("attention", "persistence"):
      name = f"{group}__{variant}_{picture}.png"
      path = os.path.join(source, f"{picture}.png")
      if mine and not os.path.exists(path) and "published_in" in mine[0]:  # the copy published beside its record
        path = os.path.join(os.path.dirname(mine[0]["published_in"]), name)
      if mine and os.path.exists(path):
        names.append(name)
        shutil.copy(path, os.path.join(plot_dir, name))
  return names


def write_tensorboard(records: list[dict[str, Any]], study_dir: str) -> str:
  """Mean validation CE per variant as TensorBoard scalars against tokens and against GFLOPs."""
  from neon_qtg_jax.training.metric_writers import TensorBoardWriter  # pylint: disable=import-outside-toplevel
  logdir = os.path.join(study_dir, "tensorboard")
  shutil.rmtree(logdir, ignore_errors=True)  # rewritten from the records each time
  keys = sorted({(r["group"], r["variant"]) for r in records})
  for group, variant in keys:
    mine = [r for r in records if r["group"] == group and r["variant"] == variant]
    writer = TensorBoardWriter(os.path.join(logdir, group, variant))
    for x, tag, scale in (("tokens", "val_ce_mean/by_tokens", 1.0), ("flops", "val_ce_mean/by_gflops", 1e-9)):
      curves = _curves(mine, x)
      if curves is None:
        continue
      for xv, yv in zip(*curves):
        writer.write_scalars(int(xv * scale), {tag: float(yv.mean())})
    writer.close()
  return logdir


def plot_lr_grid(group: dict[str, Any], out_dir: str) -> list[str]:
  """One PNG per group with an lr grid: tuning bits/byte against the learning rate, one line per variant."""
  grid = group.get("lr_grid")
  if not grid or not any(isinstance(b, float) for v in grid["variants"] for b in v["tune_bits_per_byte"]):
    return []
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for v in grid["variants"]:
    points = [(lr, b) for lr, b in zip(grid["grid"], v["tune_bits_per_byte"]) if isinstance(b, float)]
    if not points:
      continue
    line, = ax.plot(*zip(*points), marker="o", label=v["label"])
    if v["chosen"] is not None and v["chosen"] in dict(points):
      ax.plot([v["chosen"]], [dict(points)[v["chosen"]]], marker="*", markersize=14, color=line.get_color())
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("tuning-split bits/byte (lower is better)")
  ax.set_title(f"{group['title']}: learning-rate grid on the tuning split (star: chosen)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, f"{group['name']}_lr_grid.png")
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return [path]


def _fmt_interval(interval: dict[str, float] | None) -> str:
  if interval is None:
    return "n/a"
  return f"{interval['difference']:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]"


def _fmt_mean(variant: dict[str, Any], metric: str, digits: int) -> str:
  """mean ± std over seeds; the mean alone for one seed."""
  value = variant[metric]
  if variant["seeds_done"] < 2:
    return f"{value['mean']:.{digits}f}"
  return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def _reading(verdict: str, name: str, baseline: str) -> str:
  """The verdict of `name` against the baseline in words that cannot be misread."""
  if verdict in ("better", "worse"):
    return f"`{name}` {verdict} than `{baseline}`"
  return verdict


def _mean_text(values: list[float]) -> str:
  mean, std = stats.mean_std(values)
  return f"{mean:.4f}" if len(values) < 2 else f"{mean:.4f} ± {std:.4f}"


def comparison_table(study_json: dict[str, Any], a: str, b: str) -> list[str]:
  """`a` against `b` in every group that has both: a sentence counting the groups where `a` is worse, better
  or neither, and one row per group."""
  lines = [f"| group | `{b}` bits/byte | `{a}` bits/byte | `{a}` minus `{b}` [95% CI] | reading | seeds |",
           "| --- | --- | --- | --- | --- | --- |"]
  verdicts = []
  for group in study_json["groups"]:
    pair = next((c for c in group.get("comparisons", []) if (c["a"], c["b"]) == (a, b)), None)
    if pair is None:
      continue
    bits_a, bits_b = pair["bits_per_byte"][a], pair["bits_per_byte"][b]
    if not bits_a or not bits_b:
      lines.append(f"| {group['title']} | | | | not run yet | |")
      continue
    verdicts.append(pair["verdict"])
    lines.append(f"| {group['title']} | {_mean_text(bits_b)} | {_mean_text(bits_a)} | {_fmt_interval(pair['interval'])} "
                 f"| {_reading(pair['verdict'], a, b)} | {len(bits_b)} + {len(bits_a)} |")
  counts = collections.Counter(verdicts)
  summary = (f"Of {len(verdicts)} group(s) with both run, `{a}` is worse than `{b}` in "
             f"{counts['worse']}, better in {counts['better']}, and not measurably different in "
             f"{counts[stats.NO_DIFFERENCE]}" + (f"; {counts['too few seeds for an interval']} have too few seeds for "
                                                 "an interval" if counts["too few seeds for an interval"] else "")
             + " (worse and better only where the 95% interval excludes 0).")
  return [summary, ""] + lines


def _budget_text(budget: dict[str, Any]) -> str:
  if budget["kind"] == "tokens":
    return f"equal tokens: {budget['steps']} steps for every variant"
  if budget["kind"] == "flops":
    return (f"equal training FLOPs: the FLOPs of {budget['steps']} steps of `{budget['reference']}` "
            f"(steps per variant from `--mode=info`'s FLOPs per token)")
  return (f"equal wall time: {budget['minutes']} minutes of training per run (the trainer's clock, compilation and "
          f"evaluations included), at most {budget['max_steps']} steps; the learning-rate schedule runs over "
          f"{budget['max_steps']} steps, so a run the clock stops ends before its schedule does")


def _steps_text(v: dict[str, Any], budget: dict[str, Any]) -> str:
  if budget["kind"] != "wall_time":
    return str(v["steps"])
  low, high = v["steps_range"]
  spread = f" ({low}-{high})" if low != high else ""
  return (f"{v['steps']}{spread} of {v['planned_steps']}"
          + (f", {v['stopped_by_clock']}/{v['seeds_done']} stopped by the clock" if v["stopped_by_clock"] else ""))


def lr_grid_table(grid: dict[str, Any], group_budget: dict[str, Any]) -> list[str]:
  """Every grid value's tuning bits/byte per variant; the chosen one in bold."""
  budget = grid["budget"]
  budget_text = "the group's" if budget == group_budget else _budget_text(budget)
  lines = [f"Learning rate per variant, chosen from the same grid for every variant by the lowest bits/byte on the "
           f"tuning split (`data.tune_fraction`: documents carved out of train by the document hash, disjoint from "
           f"train and validation; never scored in the tables of this report): one tuning run per value, seed "
           f"{grid['seed']}, budget: {budget_text}.", "",
           "| variant | " + " | ".join(f"lr {lr:g}" for lr in grid["grid"]) + " | chosen |",
           "| --- |" + " --- |" * (len(grid["grid"]) + 1)]
  for v in grid["variants"]:
    cells = []
    for lr, bits, steps, clock in zip(grid["grid"], v["tune_bits_per_byte"], v["steps"], v["stopped_by_clock"]):
      if bits is None:
        cells.append("not run yet")
        continue
      text = "diverged" if bits == "diverged" else f"{bits:.4f}"
      if budget["kind"] == "wall_time" and steps is not None:
        text += f" ({steps} step{'s' if steps != 1 else ''}{', stopped by the clock' if clock else ''})"
      cells.append(f"**{text}**" if lr == v["chosen"] else text)
    chosen = f"{v['chosen']:g}" if v["chosen"] is not None else "not yet"
    lines.append(f"| {v['label']} | " + " | ".join(cells) + f" | {chosen} |")
  return lines + [""]


def group_table(group: dict[str, Any], baseline: str) -> list[str]:
  lines = ["| variant | parameters (blocks) | lr | steps | tokens | train FLOPs | seeds | val bits/byte "
           f"| val perplexity | bits/byte vs `{baseline}` [95% CI] | reading | train time per run |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for v in group["variants"]:
    if not v.get("seeds_done"):
      lines.append(f"| {v['label']} | | | | | | 0/{v['seeds_planned']} | not run yet | | | | |")
      continue
    reading = "baseline" if v["name"] == baseline else _reading(v["verdict"], v["name"], baseline)
    lr = ", ".join(f"{x:g}" for x in v.get("lr") or []) or "n/a"
    lines.append(
        f"| {v['label']} | {v['params']:,} ({v['non_embedding_params']:,}) | {lr} | {_steps_text(v, group['budget'])} "
        f"| {v['tokens'] / 1e6:.2f}M | {v['train_flops']:.2e} | {v['seeds_done']}/{v['seeds_planned']} "
        f"| {_fmt_mean(v, 'bits_per_byte', 4)} | {_fmt_mean(v, 'perplexity', 2)} "
        f"| {_fmt_interval(v.get('vs_baseline_bits_per_byte'))} | {reading} | {v['train_seconds_mean']:.0f} s |")
  return lines


def _findings(group: dict[str, Any], baseline: str) -> list[str]:
  lines = []
  baseline_seeds = next((v.get("seeds_done", 0) for v in group["variants"] if v["name"] == baseline), 0)
  for v in group["variants"]:
    if v["name"] == baseline or not v.get("seeds_done"):
      continue
    interval = v.get("vs_baseline_bits_per_byte")
    if interval is None:
      lines.append(f"- {v['label']}: {v['seeds_done']} seed(s); too few for an interval, no claim.")
    elif v["verdict"] == stats.NO_DIFFERENCE:
      lines.append(f"- {v['label']}: no measurable difference from `{baseline}` "
                   f"({_fmt_interval(interval)} bits/byte; the interval includes 0).")
    else:
      direction = "lower" if v["verdict"] == "better" else "higher"
      lines.append(f"- {v['label']}: {v['verdict'].upper()} than `{baseline}`: bits/byte {direction} by "
                   f"{abs(interval['difference']):.4f} (95% CI {_fmt_interval(interval)}; {v['seeds_done']} seeds "
                   f"against {baseline_seeds}).")
  return lines


def _per_layer_lines(group: dict[str, Any]) -> list[str]:
  """Attention entropy per layer and every learned per-head attention scalar, per variant."""
  lines = []
  entropies = [v for v in group["variants"] if v.get("attention_entropy_per_layer")
               or v.get("attention_entropy_errors")]
  if entropies:
    lines += ["Attention entropy relative to uniform attention over the prefix (1: uniform, 0: one token), per layer, "
              "mean over heads and seeds (8 fixed validation windows of each final checkpoint; "
              "`neon_qtg_jax/study/readout.py`):", ""]
    for v in entropies:
      measured = v.get("attention_entropy_per_layer")
      lines.append(f"- {v['label']}: " + (", ".join(f"L{i} {e:.2f}" for i, e in enumerate(measured)) if measured
                                          else "not measured: " + "; ".join(v["attention_entropy_errors"])))
    lines.append("")
  scalars = [v for v in group["variants"] if v.get("attention_scalars_mean")]
  if scalars:
    lines += ["Learned per-head attention scalars (every attention parameter of shape (layers, heads); a `_raw` "
              "parameter shown after its softplus), mean over seeds, per layer: heads", ""]
    for v in scalars:
      for name, value in v["attention_scalars_mean"].items():
        per_layer = "; ".join(f"L{i}: " + ", ".join(f"{g:.2f}" for g in layer) for i, layer in enumerate(value))
        lines.append(f"- {v['label']}, `{name}`: {per_layer}")
    lines.append("")
  return lines


def code_lines(code: dict[str, Any]) -> list[str]:
  if not code["versions"]:
    return []
  lines = ["## Code versions", "",
           "The code each reported run was made with (every attempt of a resumed run; recorded by the run, "
           "not at report time). A finished run is reused when its whole config equals the study file's; a "
           "different code version alone does not make it stale (`tools/study.py --require_same_code` does).", "",
           "| code (commit + uncommitted changes) | git describe | runs |", "| --- | --- | --- |"]
  lines += [f"| `{v['label']}` | `{v['describe']}` | {v['runs']} |" for v in code["versions"]]
  lines.append("")
  if code["flagged"]:
    lines += [f"Made (wholly or partly) by other code than the majority's `{code['majority']}`: "
              + ", ".join(f"`{k}`" for k in code["flagged"]) + ".", ""]
  return lines


def geometry_section(study_json: dict[str, Any]) -> list[str]:
  """The first section when the study states a decision rule: the rule (written before the runs), the MQAR
  sweep's readout and figure, and the verdict, or what is missing for one."""
  study = study_json["study"]
  rule = study.get("decision_rule")
  if not rule:
    return []
  lines = [f"## {rule['question']}", "", f"**The decision rule** (written on {rule['written']}, before the sweep "
           f"and the language runs it reads): {rule['text']}", ""]
  sweep_dir = study.get("recall_sweep_dir")
  recall_word = None
  if sweep_dir:
    from neon_qtg_jax.evaluation import recall, recall_sweep  # pylint: disable=import-outside-toplevel
    records = recall_sweep.read(sweep_dir) if os.path.isdir(sweep_dir) else []
    seeds = len(rule.get("seeds", (0, 1, 2)))
    summary = recall_sweep.readout(records, seeds)
    recall_word = recall_sweep.recall_reading(summary)
    every = recall_sweep.cells(seeds=tuple(range(seeds)))
    done = {(r["variant"], r["num_pairs"], r["width"], r["seed"]) for r in records}
    missing = [c for c in every if (c.arm, c.pairs, c.width, c.seed) not in done]
    skipped = sum(1 for c in missing if recall_sweep.settled_below(records, c) is not None)
    complete = skipped == len(missing)  # every cell the readout can use has run
    sweep = {"dir": sweep_dir, "runs": len(records), "planned": len(every), "solved": recall.SOLVED, "seeds": seeds,
             "figure": os.path.join(sweep_dir, "mqar_sweep.png")}
    lines += recall_settings(study.get("recall_gate_dir"), study.get("recall_tune_dir"))
    lines += [f"**MQAR sweep** (`tools/recall.py --sweep`, results in `{sweep['dir']}`: {sweep['runs']} of "
              f"{sweep['planned']} cells run, {skipped} not needed because the arm failed a smaller level at that "
              "width): held-out accuracy, mean over seeds, per number of key-value pairs; the "
              f"last column is the largest level solved (>= {sweep['solved']}) on every seed with every smaller "
              "level solved too. The no-recall floor of every level is its chance level (values are distinct "
              "within a row). Gate: a level is read only where `gpt_spec` solves it on every seed.", ""]
    lines += (recall_sweep.markdown(summary, seeds) if summary else ["No sweep results yet."]) + [""]
    if os.path.exists(sweep["figure"]):
      lines += [f"![MQAR sweep]({os.path.relpath(sweep['figure'], 'docs')})", ""]
    lines += [f"**The rule's recall half** (part a, {'the sweep complete' if complete else 'from the cells run so far'}): "
              f"{recall_word or 'open: the cells run so far do not decide it'}.", ""]
  a, b = rule["arms"]
  lines += [f"**Language**: `{a}` against `{b}` in every group that has both (final validation bits per byte, mean "
            "± std over seeds; lower is better).", ""] + comparison_table(study_json, a, b) + [""]
  language = [pair["verdict"] for group in study_json["groups"] if group["name"] in rule["language_groups"]
              for pair in group.get("comparisons", []) if (pair["a"], pair["b"]) == (a, b)]
  language_word = None
  if len(language) == len(rule["language_groups"]) and "not run yet" not in language:
    language_word = ("better" if all(v == "better" for v in language) else
                     "worse" if all(v == "worse" for v in language) else "no difference")
  lines += [f"**Verdict:** {geometry_verdict(recall_word, language_word, a, b)}", ""]
  if study.get("verdict_note"):  # what was measured after the rule was applied (it leaves the rule as written)
    lines += [study["verdict_note"], ""]
  return lines


def _records(directory: str | None) -> list[dict[str, Any]]:
  """The JSON records in a directory, by file name; none when it is unset or absent."""
  if not directory or not os.path.isdir(directory):
    return []
  return [json.loads(pathlib.Path(directory, name).read_text(encoding="utf-8"))
          for name in sorted(os.listdir(directory)) if name.endswith(".json")]


def recall_settings(gate_dir: str | None, tune_dir: str | None) -> list[str]:
  """The recall settings: the gate's runs (`gpt_spec` on MQAR small per seed) and the learning rate per arm
  chosen on the tuning rows, from their JSON records."""
  lines: list[str] = []
  gate = _records(gate_dir)
  if gate:
    first = gate[0]
    lines += [f"**Recall: the settings.** The gate (`python tools/recall.py --variant=gpt_spec --task=mqar "
              f"--preset=small --seed=S`): {first['num_pairs']} pairs in rows of {first['seq_len'] - 1} tokens, "
              f"vocabulary {first['task_spec']['vocab_size']}, width {first['width']} with "
              f"{first['model']['num_heads']} head(s), lr {first['lr']}, batch {first['batch_size']}, at most "
              f"{first['max_steps']} steps (early stop on the tuning rows); held-out accuracy per seed:", "",
              "| seed | held-out accuracy | no-recall floor | steps | seconds |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['seed']} | {r['accuracy']:.4f} | {r['no_recall_floor']:.3f} | {r['steps']} | {r['seconds']:.0f} |"
              for r in gate] + [""]
  tuned = _records(tune_dir)
  if tuned:
    lines += ["Learning rate per arm (`tools/recall.py --tune`, tuning rows only, seed 0; the chosen rate has the "
              "best tuning accuracy, ties broken by the fewest steps to 0.99):", "",
              "| arm | preset | chosen lr | tuning accuracy per lr (steps to 0.99) |", "| --- | --- | --- | --- |"]
    for t in tuned:
      runs = ", ".join(f"{r['lr']:g}: {r['tune_accuracy']:.3f} ({r['steps_to_solved'] or '-'})" for r in t["runs"])
      lines.append(f"| `{t['variant']}` | {t.get('preset', '')} | {t['chosen_lr']:g} | {runs} |")
    lines.append("")
  return lines


def geometry_verdict(recall_word: str | None, language_word: str | None, a: str, b: str) -> str:
  """The rule's reading in one sentence from its two halves (None: that half is not complete)."""
  for word in ("better", "worse"):
    if word in (recall_word, language_word):
      where = " and ".join(half for half, w in (("recall", recall_word), ("language", language_word)) if w == word)
      gain = "adds value" if word == "better" else "costs value"
      return f"the exact geometry {gain}: `{a}` is {word} than `{b}` on {where} by the rule above."
  if recall_word is None or language_word is None:
    missing = " and ".join(h for h, w in (("the MQAR sweep", recall_word), ("the language runs", language_word))
                           if w is None)
    return f"not decided yet: {missing} that the rule reads are not complete."
  return (f"the exact geometry adds nothing measurable: `{a}` is not different from its second-order twin `{b}` "
          "on recall or on language at these shapes.")


def markdown(study_json: dict[str, Any], plot_dir_rel: str) -> str:
  """The report: recall table, main result, one section per group, code versions, stale, failed and
  pending runs, notes, and how to reproduce."""
  study, baseline = study_json["study"], study_json["study"]["baseline"]
  done, planned = study_json["runs_finished"], study_json["runs_planned"]
  status = "complete" if done == planned else f"INCOMPLETE: {done} of {planned} runs finished"
  lines = [f"# Is QTG any good? {study.get('title', study['name'])}", "",
           f"Written by `tools/study.py` from `study.json` on {study_json['date']} ({status}). "
           f"Machine: {study_json['machine']['devices']}, {study_json['machine']['cpu_count']} CPU cores, "
           f"jax {study_json['machine']['jax']}. "
           f"Report written by code `{study_json['machine'].get('code', 'unknown')}`; "
           "the code of each run is under Code versions.", ""]
  lines += [study.get("description", ""), ""] if study.get("description") else []
  lines += ["Every run: its own seed for the initialisation and the data order (seed s: `seed=s`, "
            "`data.shuffle_seed=s`); the final checkpoint is scored with `--mode=eval` on the whole "
            "validation split (bits per byte of the original text). Differences are against "
            f"`{baseline}` in the same group: Welch's 95% interval over seeds; an interval that includes 0 "
            "is reported as no measurable difference.", ""]
  lines += geometry_section(study_json)
  recall = study_json.get("recall")
  if recall is not None:
    lines += ["## Associative recall (`tools/recall.py`)", "",
              f"Accuracy on the scored positions of held-out sequences (the values for MQAR and lookup, the "
              f"repeat for induction), mean ± std over seeds with each seed's; how many seeds reached "
              f"{recall_table.SOLVED}; chance level; "
              f"training steps and seconds (mean over seeds); attention entropy per layer relative to uniform "
              f"(mean over seeds). From the results in `{recall['dir']}`.", ""]
    lines += [study["recall_note"], ""] if study.get("recall_note") else []
    lines += recall_table.markdown(recall["rows"], recall["dir"])
  pairs = spec.comparisons(study)
  if pairs:
    lines += ["## Main result", ""]
    for a, b in pairs:
      lines += [f"`{a}` against `{b}` in every group that has both (final validation bits per byte, mean ± std "
                "over seeds; lower is better).", ""] + comparison_table(study_json, a, b) + [""]
  for group in study_json["groups"]:
    steps_note = (" The steps column gives the steps reached (mean, min-max over seeds) of the cap."
                  if group["budget"]["kind"] == "wall_time" else "")
    lines += [f"## {group['title']}", "", f"Budget: {_budget_text(group['budget'])}.{steps_note}", ""]
    if group["overrides"]:
      lines += ["Group overrides: " + ", ".join(f"`{k}={v}`" for k, v in group["overrides"].items()
                                                 if k != "data.paths") + ".", ""]
    if group.get("lr_from"):
      source = next(g["title"] for g in study_json["groups"] if g["name"] == group["lr_from"]["group"])
      rates = ", ".join(f"`{name}` {lr:g}" if lr is not None else f"`{name}` not chosen yet"
                        for name, lr in group["lr_from"]["chosen"].items())
      lines += [f"Learning rates: each variant's as chosen in \"{source}\" (its grid above), not tuned for this "
                f"group: {rates}.", ""]
    if group.get("lr_grid"):
      lines += lr_grid_table(group["lr_grid"], group["budget"])
      name = f"{group['name']}_lr_grid.png"
      if name in study_json["plots"]:
        lines += [f"![{name}]({plot_dir_rel}/{name})", ""]
    lines += group_table(group, baseline) + [""]
    for name in (f"{group['name']}_curves.png", f"{group['name']}_comparison.png"):
      if name in study_json["plots"]:
        lines += [f"![{name}]({plot_dir_rel}/{name})", ""]
    findings = _findings(group, baseline)
    if findings:
      lines += ["Reading:", ""] + findings + [""]
    lines += _per_layer_lines(group)
    for name in study_json["plots"]:
      if name.startswith(f"{group['name']}__"):
        lines += [f"![{name}]({plot_dir_rel}/{name})", ""]
  lines += code_lines(study_json["code_versions"])
  for title, entries in (("Stale runs (made under other settings; not reused)", study_json["stale"]),
                         ("Failed runs", study_json["failures"]), ("Not run yet", study_json["pending"])):
    if entries:
      lines += [f"## {title}", ""] + [f"- {e}" for e in entries] + [""]
  lines += unchecked_lines(study_json.get("unchecked", []))
  lines += ["## What this does and does not show", ""] + [f"- {n}" for n in study.get("notes", [])] + [""]
  lines += ["## Reproduce", "", "```", study_json["command"], "```", "",
            "Each run's workdir holds its checkpoints, logs, TensorBoard events, `run.json` (its whole config), "
            "`attempts.jsonl` (the code of each attempt) and `eval/final_val.json` (`final_tune.json` for a tuning "
            "run); `study.json` holds every run's record (config, code, seed, parameters, FLOPs per token, tokens, "
            "wall time, final and best validation loss, perplexity, bits per byte, attention entropy and learned "
            "scalars, curve), the tuning runs and the lr choices. `tools/analyze.py --workdir=RUN` draws what a "
            "trained model does.", ""]
  return "\n".join(lines)


def unchecked_lines(entries: list[str]) -> list[str]:
  """The published records reused without comparing their data with this machine's, grouped by reason."""
  if not entries:
    return []
  by_reason: dict[str, list[str]] = {}
  for entry in entries:
    key, reason = entry.split(": ", 1)
    by_reason.setdefault(reason, []).append(f"`{key}`")
  lines = [f"## Published records reused without a data check ({len(entries)})", "",
           "Their config equals the run's, but whether they were trained on the data prepared here is not known; a "
           "difference in the prepared data (another tokenizer, another corpus version) changes bits per byte.", ""]
  for reason, keys in by_reason.items():
    lines += [f"- {reason}: {', '.join(keys)}"]
  return lines + [""]


def write_report(study: dict[str, Any], outcome: Outcome, runs_planned: int, study_dir: str, command: str,
                 publish: str = "", recall_dir: str = "") -> dict[str, Any]:
  """Writes study.json, the plots, TensorBoard curves and report.md (and `publish`, with its plots beside it)."""
  import json  # pylint: disable=import-outside-toplevel
  records = outcome.records
  plot_dir = os.path.join(study_dir, "plots")
  os.makedirs(plot_dir, exist_ok=True)
  groups = summarize(study, outcome)
  plots = []
  for group in groups:
    plots += [os.path.basename(p) for p in plot_lr_grid(group, plot_dir)]
    plots += [os.path.basename(p) for p in plot_group(group, records, plot_dir, study["baseline"])]
  plots += copy_analysis_pictures(study, records, plot_dir)
  write_tensorboard(records, study_dir)
  recall = None
  if recall_dir:
    recall = {"dir": recall_dir, "rows": recall_table.summarize(recall_table.read_results(recall_dir))}
  study_json = {
      "study": {k: v for k, v in study.items() if k != "groups"}, "date": datetime.date.today().isoformat(),
      "machine": machine(), "command": command, "runs_planned": runs_planned,
      "runs_finished": len(records) + len(outcome.tuning), "failures": outcome.failures, "stale": outcome.stale,
      "unchecked": outcome.unchecked,
      "pending": outcome.pending, "code_versions": code_versions(records + outcome.tuning), "recall": recall,
      "groups": groups, "plots": plots, "lr_choices": outcome.lr_choices, "runs": records,
      "tuning_runs": outcome.tuning,
  }
  with open(os.path.join(study_dir, "study.json"), "w", encoding="utf-8") as f:
    json.dump(study_json, f, indent=1)
  with open(os.path.join(study_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(markdown(study_json, "plots"))
  if publish:
    target_dir = os.path.join(os.path.dirname(os.path.abspath(publish)), "results")
    os.makedirs(target_dir, exist_ok=True)
    for name in plots:
      shutil.copy(os.path.join(plot_dir, name), os.path.join(target_dir, name))
    shutil.copy(os.path.join(study_dir, "study.json"), os.path.join(target_dir, "study.json"))
    with open(publish, "w", encoding="utf-8") as f:
      f.write(markdown(study_json, "results"))
  return study_json


def republish(study: dict[str, Any], study_json_path: str, publish: str) -> None:
  """`publish` written again from a published study.json (its runs and groups as they were), with the study
  file's study-wide fields now (the decision rule, notes, the sweep directory): a report section added after the
  runs needs no run directories."""
  import json  # pylint: disable=import-outside-toplevel
  with open(study_json_path, encoding="utf-8") as f:
    study_json = json.load(f)
  study_json["study"] |= {k: v for k, v in study.items() if k != "groups"}
  study_json["runs_planned"] = len(spec.expand(study))
  with open(publish, "w", encoding="utf-8") as f:
    f.write(markdown(study_json, os.path.relpath(os.path.dirname(study_json_path), os.path.dirname(publish) or ".")))
