"""study.json from the run records: statistics per variant, the comparison to the baseline, plots,
TensorBoard curves and the Markdown report (docs/RESULTS.md is written from it)."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from typing import Any

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

from neon_qtg_jax.study import stats  # noqa: E402  pylint: disable=wrong-import-position

METRICS = ("bits_per_byte", "perplexity", "loss")


def code_version() -> str:
  """`git describe --always --dirty` of this checkout: which code made the runs ("unknown" outside git)."""
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def machine() -> dict[str, Any]:
  return {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "cpu_count": os.cpu_count(),
          "code": code_version()}


def _analysis(record: dict[str, Any]) -> dict[str, Any] | None:
  """The run's analysis/summary.json from tools/analyze.py, when it has been made."""
  import json  # pylint: disable=import-outside-toplevel
  path = os.path.join(record["workdir"], "analysis", "summary.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _variant_summary(records: list[dict[str, Any]], baseline: list[dict[str, Any]], is_baseline: bool
                     ) -> dict[str, Any]:
  out: dict[str, Any] = {"seeds": [r["seed"] for r in records]}
  for metric in METRICS:
    mean, std = stats.mean_std([r["final"][metric] for r in records])
    out[metric] = {"mean": mean, "std": std}
  first = records[0]
  for field in ("params", "non_embedding_params", "train_flops_per_token", "steps", "tokens", "train_flops"):
    out[field] = first[field]
  out["train_seconds_mean"] = stats.mean_std([r["train_seconds"] for r in records])[0]
  entropies = [np.asarray(a["attention_normalized_entropy"]) for a in map(_analysis, records) if a]
  out["attention_entropy_per_layer"] = (np.mean([e.mean(axis=1) for e in entropies], axis=0).round(3).tolist()
                                        if entropies else None)
  gammas = [np.asarray(r["gamma"]) for r in records if r.get("gamma") is not None]
  out["gamma_mean"] = np.mean(gammas, axis=0).round(3).tolist() if gammas else None
  if not is_baseline:
    interval = stats.welch_interval([r["final"]["bits_per_byte"] for r in records],
                                    [r["final"]["bits_per_byte"] for r in baseline])
    out["vs_baseline_bits_per_byte"] = interval
    out["verdict"] = stats.verdict(interval) if baseline else "baseline not run yet"
  return out


def summarize(study: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per group and variant: seeds finished, mean and std of each metric, Welch CI against the baseline."""
  groups = []
  for group in study["groups"]:
    in_group = [r for r in records if r["group"] == group["name"]]
    baseline = [r for r in in_group if r["variant"] == study["baseline"]]
    variants = []
    for variant in group["variants"]:
      mine = sorted((r for r in in_group if r["variant"] == variant["name"]), key=lambda r: r["seed"])
      seeds = variant.get("seeds", 1)
      entry = {"name": variant["name"], "label": variant.get("label", variant["name"]),
               "seeds_planned": seeds if isinstance(seeds, int) else len(seeds), "seeds_done": len(mine)}
      if mine:
        entry |= _variant_summary(mine, baseline, variant["name"] == study["baseline"])
      variants.append(entry)
    groups.append({"name": group["name"], "title": group.get("title", group["name"]), "budget": group["budget"],
                   "overrides": group.get("overrides", {}), "variants": variants})
  return groups


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
      labels.append(f"{v['label']} (n={v['seeds_done']})")
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
    ax.set_title(f"{group['title']}: final validation bits/byte against {baseline}", fontsize=9)
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
      path = os.path.join(source, f"{picture}.png")
      if mine and os.path.exists(path):
        names.append(f"{group}__{variant}_{picture}.png")
        shutil.copy(path, os.path.join(plot_dir, names[-1]))
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


def main_table(study_json: dict[str, Any]) -> list[str]:
  """One row per group: the baseline against the study's headline variant."""
  study = study_json["study"]
  baseline, headline = study["baseline"], study.get("headline")
  if headline is None:
    return []
  lines = [f"| group | `{baseline}` bits/byte | `{headline}` bits/byte | difference [95% CI] | reading | seeds |",
           "| --- | --- | --- | --- | --- | --- |"]
  for group in study_json["groups"]:
    variants = {v["name"]: v for v in group["variants"]}
    base, head = variants.get(baseline, {}), variants.get(headline, {})
    if not base.get("seeds_done") or not head.get("seeds_done"):
      lines.append(f"| {group['title']} | | | | not run yet | |")
      continue
    lines.append(f"| {group['title']} | {_fmt_mean(base, 'bits_per_byte', 4)} | {_fmt_mean(head, 'bits_per_byte', 4)} "
                 f"| {_fmt_interval(head.get('vs_baseline_bits_per_byte'))} | {head['verdict']} "
                 f"| {base['seeds_done']} + {head['seeds_done']} |")
  return lines


def _budget_text(budget: dict[str, Any]) -> str:
  if budget["kind"] == "tokens":
    return f"equal tokens: {budget['steps']} steps for every variant"
  if budget["kind"] == "flops":
    return (f"equal training FLOPs: the FLOPs of {budget['steps']} steps of `{budget['reference']}` "
            f"(steps per variant from `--mode=info`'s FLOPs per token)")
  return f"equal wall time: {budget['minutes']} minutes of training per run (at most {budget['max_steps']} steps)"


def group_table(group: dict[str, Any], baseline: str) -> list[str]:
  lines = ["| variant | parameters (blocks) | steps | tokens | train FLOPs | seeds | val bits/byte | val perplexity "
           f"| bits/byte vs `{baseline}` [95% CI] | reading | train time per run |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for v in group["variants"]:
    if not v.get("seeds_done"):
      lines.append(f"| {v['label']} | | | | | 0/{v['seeds_planned']} | not run yet | | | | |")
      continue
    reading = "baseline" if v["name"] == baseline else v["verdict"]
    lines.append(
        f"| {v['label']} | {v['params']:,} ({v['non_embedding_params']:,}) | {v['steps']} | {v['tokens'] / 1e6:.2f}M "
        f"| {v['train_flops']:.2e} | {v['seeds_done']}/{v['seeds_planned']} | {_fmt_mean(v, 'bits_per_byte', 4)} "
        f"| {_fmt_mean(v, 'perplexity', 2)} | {_fmt_interval(v.get('vs_baseline_bits_per_byte'))} | {reading} "
        f"| {v['train_seconds_mean']:.0f} s |")
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
      word = "lower (better)" if v["verdict"] == "better" else "higher (worse)"
      lines.append(f"- {v['label']}: {word} bits/byte than `{baseline}` by {abs(interval['difference']):.4f} "
                   f"(95% CI {_fmt_interval(interval)}; {v['seeds_done']} seeds against {baseline_seeds}).")
  return lines


def markdown(study_json: dict[str, Any], plot_dir_rel: str) -> str:
  """The report: setup, one table per group, the plots, gamma, the reading, commands and machine."""
  study, baseline = study_json["study"], study_json["study"]["baseline"]
  done, planned = study_json["runs_finished"], study_json["runs_planned"]
  status = "complete" if done == planned else f"INCOMPLETE: {done} of {planned} runs finished"
  lines = [f"# Is QTG any good? {study.get('title', study['name'])}", "",
           f"Written by `tools/study.py` from `study.json` on {study_json['date']} ({status}). "
           f"Machine: {study_json['machine']['devices']}, {study_json['machine']['cpu_count']} CPU cores, "
           f"jax {study_json['machine']['jax']}. Code: `{study_json['machine'].get('code', 'unknown')}` "
           f"(git describe when the report was written).", ""]
  lines += [study.get("description", ""), ""] if study.get("description") else []
  lines += ["Every run: its own seed for the initialisation and the data order (seed s: `seed=s`, "
            "`data.shuffle_seed=s`); the final checkpoint is scored with `--mode=eval` on the whole "
            "validation split (bits per byte of the original text). Differences are against "
            f"`{baseline}` in the same group: Welch's 95% interval over seeds; an interval that includes 0 "
            "is reported as no measurable difference.", ""]
  headline = main_table(study_json)
  if headline:
    lines += ["## Main result", "", f"`{study['headline']}` against `{baseline}` in every group "
              "(final validation bits per byte, mean ± std over seeds; lower is better):", ""] + headline + [""]
  for group in study_json["groups"]:
    lines += [f"## {group['title']}", "", f"Budget: {_budget_text(group['budget'])}.", ""]
    if group["overrides"]:
      lines += ["Group overrides: " + ", ".join(f"`{k}={v}`" for k, v in group["overrides"].items()
                                                 if k != "data.paths") + ".", ""]
    lines += group_table(group, baseline) + [""]
    for name in (f"{group['name']}_curves.png", f"{group['name']}_comparison.png"):
      if name in study_json["plots"]:
        lines += [f"![{name}]({plot_dir_rel}/{name})", ""]
    findings = _findings(group, baseline)
    if findings:
      lines += ["Reading:", ""] + findings + [""]
    entropies = [v for v in group["variants"] if v.get("attention_entropy_per_layer")]
    if entropies:
      lines += ["Attention entropy relative to uniform attention over the prefix (1: uniform, 0: one token), "
                "mean over heads, per layer (`tools/analyze.py`, 8 validation windows of the first seed):", ""]
      for v in entropies:
        lines.append(f"- {v['label']}: " + ", ".join(f"L{i} {e:.2f}" for i, e in
                                                     enumerate(v["attention_entropy_per_layer"])))
      lines.append("")
    for name in study_json["plots"]:
      if name.startswith(f"{group['name']}__"):
        lines += [f"![{name}]({plot_dir_rel}/{name})", ""]
    gammas = [v for v in group["variants"] if v.get("gamma_mean")]
    if gammas:
      lines += ["Learned gamma (mean over seeds), per layer: heads", ""]
      for v in gammas:
        per_layer = "; ".join(f"L{i}: " + ", ".join(f"{g:.2f}" for g in layer) for i, layer in enumerate(v["gamma_mean"]))
        lines.append(f"- {v['label']}: {per_layer}")
      lines.append("")
  if study_json["failures"]:
    lines += ["## Failed runs", ""] + [f"- {f}" for f in study_json["failures"]] + [""]
  lines += ["## What this does and does not show", ""] + [f"- {n}" for n in study.get("notes", [])] + [""]
  lines += ["## Reproduce", "", "```", study_json["command"], "```", "",
            "Each run's workdir holds its checkpoints, logs, TensorBoard events and `eval/final.json`; "
            "`study.json` holds every run's record (overrides, seed, parameters, FLOPs per token, tokens, "
            "wall time, final and best validation loss, perplexity, bits per byte, learned gamma, curve). "
            "`tools/analyze.py --workdir=RUN` draws what a trained model does.", ""]
  return "\n".join(lines)


def write_report(study: dict[str, Any], records: list[dict[str, Any]], failures: list[str], runs_planned: int,
                 study_dir: str, command: str, publish: str = "") -> dict[str, Any]:
  """Writes study.json, the plots, TensorBoard curves and report.md (and `publish`, with its plots beside it)."""
  import json  # pylint: disable=import-outside-toplevel
  plot_dir = os.path.join(study_dir, "plots")
  os.makedirs(plot_dir, exist_ok=True)
  groups = summarize(study, records)
  plots = []
  for group in groups:
    plots += [os.path.basename(p) for p in plot_group(group, records, plot_dir, study["baseline"])]
  plots += copy_analysis_pictures(study, records, plot_dir)
  write_tensorboard(records, study_dir)
  study_json = {
      "study": {k: v for k, v in study.items() if k != "groups"}, "date": datetime.date.today().isoformat(),
      "machine": machine(), "command": command, "runs_planned": runs_planned, "runs_finished": len(records),
      "failures": failures, "groups": groups, "plots": plots, "runs": records,
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
