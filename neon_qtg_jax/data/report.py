"""Data validation report of a prepared directory (plan phase 2.3).

Documents, tokens, words and tokens per document (mean and percentiles), empty and duplicate
documents, bytes per token, byte-fallback rate and the most frequent tokens; printed, written
to data_dir/report.json, and the length histogram to data_dir/lengths.png. With data.filters,
also the documents and bytes each filter step removed with examples (report.json "filters"),
a bar chart of them (filters.png), and the whole report as TensorBoard text (data_dir/tensorboard).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import numpy as np

from neon_qtg_jax.data import filters
from neon_qtg_jax.data.manifest import Manifest
from neon_qtg_jax.data.sources import EMPTY_DOCUMENT
from neon_qtg_jax.data.stats import token_counts
from neon_qtg_jax.data.tokenizer import Tokenizer

PERCENTILES = (5, 25, 50, 75, 95, 99)
TOP_TOKENS = 25


def distribution(values: np.ndarray) -> dict[str, float]:
  """Mean, min, max and PERCENTILES of a 1-D array."""
  if len(values) == 0:
    return {"mean": 0.0}
  out = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
  out.update({f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))})
  return out


def duplicate_count(hashes: np.ndarray) -> int:
  """Documents whose exact text occurred earlier (same 64-bit hash)."""
  return int(len(hashes) - len(np.unique(hashes)))


def build_report(manifest: Manifest, tokenizer: Tokenizer) -> dict[str, Any]:
  with np.load(os.path.join(manifest.data_dir, "documents.npz")) as z:
    stats = {k: z[k] for k in z.files}
  counts = sum(token_counts(manifest.split_tokens(s), tokenizer.vocab_size) for s in manifest.tokens)
  eos = int(counts[tokenizer.eos_id])
  content_tokens = int(counts.sum()) - eos   # EOS separators are not document text
  byte_tokens = int(counts[sorted(tokenizer.byte_ids)].sum()) if tokenizer.byte_ids else 0
  order = np.argsort(-counts, kind="stable")[:TOP_TOKENS]
  total = max(int(counts.sum()), 1)
  return {
      "data_dir": manifest.data_dir,
      "source": manifest.settings["data.source"],
      "documents": {**manifest.documents, "total": int(len(stats["hash"]))},
      "tokens": {**manifest.tokens, "total": int(counts.sum()), "eos_separators": eos},
      "text_bytes": int(stats["num_bytes"].sum()),
      "tokens_per_document": distribution(stats["num_tokens"]),
      "words_per_document": distribution(stats["num_words"]),
      "bytes_per_document": distribution(stats["num_bytes"]),
      "empty_documents_skipped": int(manifest.issues["counts"].get(EMPTY_DOCUMENT, 0)),
      "duplicate_documents": duplicate_count(stats["hash"]),
      "bytes_per_token": float(stats["num_bytes"].sum() / max(content_tokens, 1)),
      "byte_fallback_rate": float(byte_tokens / max(content_tokens, 1)),
      "top_tokens": [{"id": int(i), "piece": tokenizer.id_to_piece(int(i)), "count": int(counts[i]),
                      "fraction": float(counts[i] / total)} for i in order],
      "bad_input": manifest.issues,
      "filters": filters.load_summary(manifest.data_dir),   # None without data.filters
      "vocab_size": tokenizer.vocab_size,
      "tokenizer_sha256": tokenizer.sha256,
  }


def format_report(report: dict[str, Any]) -> str:
  tpd, wpd = report["tokens_per_document"], report["words_per_document"]
  lines = [
      f"data report: {report['data_dir']} (source {report['source']}, vocab {report['vocab_size']})",
      f"  documents        {report['documents']}",
      f"  tokens           {report['tokens']}",
      f"  text bytes       {report['text_bytes']:,}",
      "  tokens/document  " + ", ".join(f"{k} {v:.0f}" for k, v in tpd.items()),
      "  words/document   " + ", ".join(f"{k} {v:.0f}" for k, v in wpd.items()),
      f"  empty documents skipped {report['empty_documents_skipped']}, "
      f"duplicate documents {report['duplicate_documents']}",
      f"  bytes/token {report['bytes_per_token']:.3f}, byte-fallback rate {report['byte_fallback_rate']:.5f}",
      "  top tokens       " + ", ".join(f"{t['piece']!r} {t['fraction']:.3f}" for t in report["top_tokens"][:12]),
  ]
  counts = report["bad_input"]["counts"]
  lines.append("  bad input        " + (", ".join(f"{k} {v}" for k, v in counts.items()) if counts else "none"))
  if report.get("filters"):
    lines.append("  " + filters.format_summary(report["filters"]).replace("\n", "\n  "))
  return "\n".join(lines)


def plot_filter_removals(summary: dict[str, Any], path: str) -> None:
  """Bar chart of the documents and MB each filter step removed, as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = list(summary["removed"])
  docs = [summary["removed"][s]["docs_removed"] for s in steps]
  mb = [(summary["removed"][s]["bytes_removed"] + summary["removed"][s]["line_bytes_removed"]) / 1e6 for s in steps]
  fig, (ax_docs, ax_mb) = plt.subplots(1, 2, figsize=(11, 4))
  for ax, values, label in ((ax_docs, docs, "documents removed"), (ax_mb, mb, "MB removed (documents + lines)")):
    bars = ax.bar(range(len(steps)), values, color="tab:red")
    ax.bar_label(bars, labels=[f"{v:,.0f}" if ax is ax_docs else f"{v:.3g}" for v in values], fontsize=8)
    ax.set_xticks(range(len(steps)), steps, rotation=30, ha="right")
    ax.set_ylabel(label)
  fig.suptitle(f"filters: {summary['documents_in']:,} documents in, {summary['documents_out']:,} kept "
               f"({summary['bytes_in'] / 1e6:.1f} MB in, {summary['bytes_out'] / 1e6:.1f} MB kept)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_tensorboard_text(report: dict[str, Any], logdir: str) -> None:
  """The printed report as TensorBoard text ("data_report"; indented: a markdown code block)."""
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

  with SummaryWriter(logdir=logdir) as writer:
    writer.add_text("data_report", "    " + format_report(report).replace("\n", "\n    "), 0)


def plot_lengths(num_tokens: np.ndarray, path: str, title: str) -> None:
  """Histogram of tokens per document (log-spaced bins) as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  positive = num_tokens[num_tokens > 0]
  if len(positive):
    bins = np.logspace(0, np.log10(positive.max() + 1), 50)
    ax.hist(positive, bins=bins, color="tab:blue")
    ax.axvline(np.median(positive), color="k", linestyle="--", label=f"median {np.median(positive):.0f}")
    ax.legend()
  ax.set_xscale("log")
  ax.set_xlabel("tokens per document")
  ax.set_ylabel("documents")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(manifest: Manifest, *, progress: bool = True) -> dict[str, Any]:
  """Builds the report; writes report.json, lengths.png, filters.png (with data.filters) and TensorBoard text
  (data_dir/tensorboard) into data_dir; prints it when progress."""
  tokenizer = Tokenizer.load(manifest.data_dir)
  report = build_report(manifest, tokenizer)
  with open(os.path.join(manifest.data_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  with np.load(os.path.join(manifest.data_dir, "documents.npz")) as z:
    plot_lengths(z["num_tokens"], os.path.join(manifest.data_dir, "lengths.png"),
                 f"{manifest.settings['data.source']}: {len(z['num_tokens']):,} documents")
  if report["filters"]:
    plot_filter_removals(report["filters"], os.path.join(manifest.data_dir, "filters.png"))
  tb_dir = os.path.join(manifest.data_dir, "tensorboard")
  shutil.rmtree(tb_dir, ignore_errors=True)   # one event file: a rewritten report replaces the old one
  write_tensorboard_text(report, tb_dir)
  if progress:
    print(format_report(report), file=sys.stderr, flush=True)
  return report
