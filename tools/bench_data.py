"""Data benchmark: preparation throughput and loader batches/s, each against a plain baseline in this process.

Preparation: `prepare_dataset` (read, tokenize on N processes, write shards, merge, report) against
a plain single-process loop (read, `sp.encode` per document, write the ids), both with the same
already-trained tokenizer. Prints MB/s of text in total and per core, and what the per-core figure
means for OpenWebText (38 GB) on 32 cores against the seed plan's 4-6 hour budget.

Loader: batches/s of `make_train_iterator` against plain numpy (random window starts, slice and
stack from the memmap) for the same batch shape.

Filters (--filters): the data.filters pass over the same corpus as one in-process datatrove task
(so this process's CPU time is all of it), as MB of input per CPU second per stage and in total, then
again with 1 and 2 tasks on as many processes (--filter_task_counts: measured scaling, each task's CPU);
then preparation with filters (filter pass + tokenizing the kept documents) against without, and
the hours that means for OpenWebText on 32 cores. --planted benchmarks the planted corpus
(fortunes prose with duplicates, spam and short documents; data/planted.py).

  python tools/bench_data.py                                  # the stdlib corpus, all cores
  python tools/bench_data.py --max_documents=500 --num_processes=2 --output=bench_data.json
  python tools/bench_data.py --source=jsonl --paths=data/train.jsonl
  python tools/bench_data.py --openwebtext_layout      # stdlib text packed as urlsf_subset00.tar (xz members)
  python tools/bench_data.py --planted --filters=fineweb --num_processes=2 --loader_batches=0
  python tools/bench_data.py --prose=ru --filters=web --languages=ru --num_processes=2 --loader_batches=0
  python tools/bench_data.py --filters=code --num_processes=2 --loader_batches=0 --filter_task_counts=1,2
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import sentencepiece as spm

from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.data import prepare, sources
from neon_qtg_jax.data.tokenizer import EOS_ID, sample_sentences, train_tokenizer

OPENWEBTEXT_BYTES = 38e9
SEED_BUDGET_HOURS = (4.0, 6.0)
SEED_CORES = 32


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", default="stdlib", choices=["stdlib", "openwebtext", "jsonl", "text"])
  p.add_argument("--paths", default="")
  p.add_argument("--max_documents", type=int, default=0)
  p.add_argument("--vocab_size", type=int, default=2048)
  p.add_argument("--num_processes", type=int, default=0, help="0: one per available core")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--max_length", type=int, default=128)
  p.add_argument("--loader_batches", type=int, default=300)
  p.add_argument("--loader_workers", type=int, default=0)
  p.add_argument("--openwebtext_layout", action="store_true",
                 help="pack the corpus into subsets/urlsf_subset00.tar (xz tars of .txt files) and benchmark "
                      "that, so decompression is counted as it is for OpenWebText")
  p.add_argument("--docs_per_member", type=int, default=100)
  p.add_argument("--workdir", default="", help="scratch directory (default: a temporary one, removed)")
  p.add_argument("--output", default="", help="write the results as JSON here")
  p.add_argument("--filters", default="", help="data.filters to benchmark as well (e.g. fineweb); '' for none")
  p.add_argument("--filter_tokenizer", default="regex", choices=["regex", "spacy"], help="data.filter_tokenizer")
  p.add_argument("--planted", action="store_true", help="benchmark the planted corpus (data/planted.py) as jsonl")
  p.add_argument("--prose", default="", choices=["", "en", "ru"],
                 help="benchmark 150 clean prose documents of fortunes (en) or fortunes-ru (ru) as jsonl")
  p.add_argument("--languages", default="", help="data.languages for --filters=web (e.g. ru)")
  p.add_argument("--filter_task_counts", default="1,2",
                 help="the filter pass is run with each of these task counts (one worker process per task)")
  return p.parse_args(argv)


def make_config(args, data_dir: str):
  c = default_config()
  c.model.vocab_size = args.vocab_size
  c.model.max_seq_len = max(c.model.max_seq_len, args.max_length)
  c.data.source, c.data.paths, c.data.max_documents = args.source, args.paths, args.max_documents
  c.data.data_dir = data_dir
  c.data.max_length, c.data.stride = args.max_length, args.max_length // 2
  c.data.num_workers = args.loader_workers
  c.training.batch_size, c.training.grad_accum_steps = args.batch_size, 1
  return validate(c)


def pack_openwebtext(docs, out_dir: str, docs_per_member: int) -> str:
  """Writes documents in the OpenWebText layout: subsets/urlsf_subset00.tar of xz tars of .txt files."""
  subsets = os.path.join(out_dir, "subsets")
  os.makedirs(subsets, exist_ok=True)
  path = os.path.join(subsets, "urlsf_subset00.tar")

  def add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  with tarfile.open(path, "w") as outer:
    batch, member = [], 0
    for i, doc in enumerate(docs):
      batch.append((f"{i:07d}.txt", doc.text.encode("utf-8")))
      if len(batch) == docs_per_member:
        add(outer, f"openwebtext/urlsf_subset00-{member}_data.xz", _xz_tar(batch))
        batch, member = [], member + 1
    if batch:
      add(outer, f"openwebtext/urlsf_subset00-{member}_data.xz", _xz_tar(batch))
  return path


def _xz_tar(files: list[tuple[str, bytes]]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:xz") as tar:
    for name, data in files:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def baseline_prepare(config, model_file: str, out_path: str) -> tuple[float, float, int, int]:
  """Plain loop: read each document, encode it, append ids + EOS to one file.

  Returns (wall seconds, CPU seconds, text bytes, tokens)."""
  sp = spm.SentencePieceProcessor(model_file=model_file)
  start, cpu = time.perf_counter(), time.process_time()
  text_bytes = tokens = 0
  with open(out_path, "wb") as out:
    for doc in sources.documents_from_config(config.data, sources.Issues()):
      ids = sp.encode(doc.text)
      ids.append(EOS_ID)
      np.asarray(ids, dtype=np.uint16).tofile(out)
      text_bytes += len(doc.text.encode("utf-8"))
      tokens += len(ids)
  return time.perf_counter() - start, time.process_time() - cpu, text_bytes, tokens


def bench_filters(args, config, text_bytes: int, manifest, owt_hours: float) -> dict:
  """The data.filters pass over the same corpus as one in-process task, and what it adds to preparation.

  MB are UTF-8 text of the documents read (as for tokenizing); CPU seconds are this process's."""
  from neon_qtg_jax.data import filters

  c = copy.deepcopy(config)
  c.data.filters, c.data.filter_tasks, c.data.filter_tokenizer = args.filters, 1, args.filter_tokenizer
  c.data.languages = args.languages
  c.data.data_dir = os.path.join(os.path.dirname(config.data.data_dir), "filtered")
  validate(c)
  files = sources.source_files(c.data.source, c.data.paths, sources.Issues())
  start, cpu = time.perf_counter(), time.process_time()
  filters.filter_corpus(c, files, sources.Issues(), progress=False, num_processes=1)
  wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
  summary = filters.load_summary(c.data.data_dir)
  filter_rate = summary["bytes_in"] / cpu_s / 1e6
  tokenize_cpu = manifest.timings["worker_cpu_s"] + manifest.timings["main_cpu_tokenize_s"]
  tokenize_rate = text_bytes / tokenize_cpu / 1e6
  kept = summary["bytes_out"] / summary["bytes_in"]
  with_rate = 1 / (1 / filter_rate + kept / tokenize_rate)      # MB of input per CPU second, filtered then tokenized
  filter_hours = OPENWEBTEXT_BYTES / (SEED_CORES * filter_rate * 1e6) / 3600
  print(f"filters {args.filters} ({args.filter_tokenizer} words): {summary['documents_in']} documents, {summary['bytes_in'] / 1e6:.2f} MB in, "
        f"{kept:.1%} of the bytes kept; one in-process task: {wall_s:.1f} s, {cpu_s:.1f} CPU s")
  for stage in summary["stages"]:
    print(f"  {stage['name']:<24} {stage['main_cpu_s']:7.2f} CPU s  "
          f"{summary['bytes_in'] / max(stage['main_cpu_s'], 1e-9) / 1e6:8.2f} MB per CPU second")
  print(f"MB of input per CPU second: without filters (tokenize) {tokenize_rate:.2f}, filter pass {filter_rate:.3f}, "
        f"with filters (filter, then tokenize the kept {kept:.0%}) {with_rate:.3f}")
  print(f"OpenWebText 38 GB on {SEED_CORES} cores: filter pass {filter_hours:.2f} h + tokenizing the kept text "
        f"{owt_hours * kept:.2f} h = {filter_hours + owt_hours * kept:.2f} h (without filters {owt_hours:.2f} h)")
  scaling = bench_filter_tasks(args, c, files)
  return {"filters": args.filters, "languages": args.languages, "filter_tokenizer": args.filter_tokenizer,
          "mb_in": summary["bytes_in"] / 1e6, "kept_bytes_fraction": kept,
          "filter_cpu_s": cpu_s, "filter_wall_s": wall_s, "filter_mb_per_cpu_s": filter_rate,
          "without_filters_mb_per_cpu_s": tokenize_rate, "with_filters_mb_per_cpu_s": with_rate,
          "stages": summary["stages"], "owt_filter_hours_32_cores": filter_hours,
          "owt_hours_32_cores_with_filters": filter_hours + owt_hours * kept, "tasks": scaling}


def bench_filter_tasks(args, config, files) -> list[dict]:
  """The filter pass again with each of --filter_task_counts tasks, as many worker processes as tasks: wall
  seconds, every task's own CPU seconds added up (filter_steps.QuietLocalExecutor records them), MB of input
  per task CPU second and per wall second. Measured, not extrapolated from one task."""
  from neon_qtg_jax.data import filters

  rows = []
  for tasks in [int(t) for t in args.filter_task_counts.split(",") if t.strip()]:
    c = copy.deepcopy(config)
    c.data.filter_tasks = tasks
    c.data.data_dir = os.path.join(os.path.dirname(config.data.data_dir), f"filtered_{tasks}_tasks")
    start = time.perf_counter()
    filters.filter_corpus(c, files, sources.Issues(), progress=False, num_processes=tasks)
    wall_s = time.perf_counter() - start
    summary = filters.load_summary(c.data.data_dir)
    task_cpu = sum(stage.get("task_cpu_s") or 0.0 for stage in summary["stages"])
    rows.append({"tasks": tasks, "wall_s": wall_s, "task_cpu_s": task_cpu,
                 "mb_per_cpu_s": summary["bytes_in"] / task_cpu / 1e6, "mb_per_wall_s": summary["bytes_in"] / wall_s / 1e6,
                 "documents_out": summary["documents_out"]})
  base = rows[0]["wall_s"] if rows else 1.0
  for row in rows:
    print(f"filter pass, {row['tasks']} task(s) on {row['tasks']} process(es): {row['wall_s']:6.1f} s wall "
          f"({base / row['wall_s']:.2f}x the first), {row['task_cpu_s']:6.1f} task CPU s, "
          f"{row['mb_per_cpu_s']:.3f} MB per CPU second, {row['mb_per_wall_s']:.3f} MB per wall second, "
          f"{row['documents_out']} documents kept")
  return rows


def time_batches(next_batch, count: int) -> float:
  for _ in range(5):
    next_batch()
  start = time.perf_counter()
  for _ in range(count):
    next_batch()
  return count / (time.perf_counter() - start)


def main(argv=None) -> int:
  args = parse_args(argv)
  num_processes = args.num_processes or prepare._num_processes()
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
  try:
    if args.planted:
      from neon_qtg_jax.data import planted
      args.source, args.paths = "jsonl", os.path.join(workdir, "planted.jsonl")
      planted.write_jsonl(planted.planted_corpus(), args.paths)
    if args.prose:
      import random
      from neon_qtg_jax.data import planted
      args.source, args.paths = "jsonl", os.path.join(workdir, f"prose_{args.prose}.jsonl")
      with open(args.paths, "w", encoding="utf-8") as f:
        for text in planted.clean_documents(150, random.Random(0), args.prose):
          f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    config = make_config(args, os.path.join(workdir, "prepared"))
    if args.openwebtext_layout:
      docs = sources.documents_from_config(config.data, sources.Issues())
      args.paths = pack_openwebtext(docs, workdir, args.docs_per_member)
      args.source, args.max_documents = "openwebtext", 0
      config = make_config(args, os.path.join(workdir, "prepared"))
    tok_dir = os.path.join(workdir, "tokenizer")
    sentences = sample_sentences(sources.documents_from_config(config.data, sources.Issues()),
                                 config.data.tokenizer_sample_sentences)
    tokenizer = train_tokenizer(sentences, tok_dir, vocab_size=args.vocab_size)
    os.makedirs(config.data.data_dir, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer.json"):
      shutil.copy(os.path.join(tok_dir, name), config.data.data_dir)

    base_s, base_cpu, base_bytes, base_tokens = baseline_prepare(config, tokenizer.path,
                                                                 os.path.join(workdir, "baseline.bin"))
    start = time.perf_counter()
    manifest = prepare.prepare_dataset(config, progress=False, num_processes=num_processes)
    ours_s = time.perf_counter() - start
    ours_bytes = sum(manifest.text_bytes.values())
    ours_tokens = sum(manifest.tokens.values())

    base_mbs = base_bytes / base_s / 1e6
    ours_mbs = ours_bytes / ours_s / 1e6
    tokenize_s = manifest.timings["tokenize_s"]
    stream_mbs = ours_bytes / tokenize_s / 1e6      # read + tokenize + write shards, without fixed costs
    # Per core from CPU time, not wall time: the machine may be shared, and a core busy elsewhere is not ours.
    base_per_core = base_bytes / base_cpu / 1e6
    per_core = ours_bytes / manifest.timings["worker_cpu_s"] / 1e6
    main_mbs = ours_bytes / manifest.timings["main_cpu_tokenize_s"] / 1e6   # the serial stage caps the total
    # Tokenizing scales with cores up to the serial main process; the merge copies every token once
    # (scaled from this corpus); the report's fixed cost (matplotlib) is left out.
    scale = OPENWEBTEXT_BYTES / ours_bytes
    owt_hours = (OPENWEBTEXT_BYTES / min(per_core * SEED_CORES, main_mbs) / 1e6
                 + manifest.timings["merge_s"] * scale) / 3600
    fixed = {k: round(v, 2) for k, v in manifest.timings.items() if k in ("tokenizer_s", "merge_s", "report_s")}
    print(f"corpus: {args.source}, {ours_bytes / 1e6:.1f} MB text, {sum(manifest.documents.values())} documents, "
          f"vocab {tokenizer.vocab_size}; {platform.machine()}, {os.cpu_count()} cpus, "
          f"{num_processes} prepare processes, load average {os.getloadavg()[0]:.1f}")
    print(f"baseline single-process encode loop:   {base_s:7.2f} s  {base_mbs:6.2f} MB/s, "
          f"{base_per_core:.2f} MB per CPU second")
    print(f"prepare_dataset end to end:            {ours_s:7.2f} s  {ours_mbs:6.2f} MB/s  "
          f"{ours_mbs / base_mbs:.2f}x baseline (fixed costs {fixed} s)")
    print(f"prepare_dataset tokenize phase:        {tokenize_s:7.2f} s  {stream_mbs:6.2f} MB/s  "
          f"{stream_mbs / base_mbs:.2f}x baseline")
    print(f"per core: workers {per_core:.2f} MB per CPU second ({per_core / base_per_core:.2f}x the baseline's), "
          f"main process (serial: read, dispatch, write shards) {main_mbs:.1f} MB per CPU second")
    print(f"same token count as baseline: {ours_tokens == base_tokens} ({ours_tokens} vs {base_tokens})")
    print(f"OpenWebText 38 GB on {SEED_CORES} cores at min({SEED_CORES} x {per_core:.2f}, {main_mbs:.1f}) MB/s "
          f"+ merge {manifest.timings['merge_s'] * scale / 60:.1f} min: {owt_hours:.2f} h "
          f"(seed budget {SEED_BUDGET_HOURS[0]:.0f}-{SEED_BUDGET_HOURS[1]:.0f} h: "
          f"{SEED_BUDGET_HOURS[0] / owt_hours:.0f}-{SEED_BUDGET_HOURS[1] / owt_hours:.0f}x faster)")

    results = {
        "source": args.source, "text_mb": ours_bytes / 1e6, "processes": num_processes,
        "baseline_mb_s": base_mbs, "prepare_mb_s": ours_mbs, "tokenize_phase_mb_s": stream_mbs,
        "worker_mb_per_cpu_s": per_core, "baseline_mb_per_cpu_s": base_per_core, "main_mb_per_cpu_s": main_mbs,
        "timings": manifest.timings,
        "speedup_vs_baseline": ours_mbs / base_mbs, "owt_hours_32_cores": owt_hours,
    }
    if args.filters:
      results["filters"] = bench_filters(args, config, ours_bytes, manifest, owt_hours)
    if args.output:
      with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    if args.loader_batches <= 0:
      return 0
    # Imported here, not at the top: preparation's spawned workers re-import this module, and Grain
    # would add seconds to each worker's start.
    import grain.python as pygrain
    from neon_qtg_jax.data import loader

    it = loader.make_train_iterator(config, shard_index=0, shard_count=1)
    grain_bps = time_batches(lambda: next(it), args.loader_batches)
    it_default = loader.make_train_iterator(config, shard_index=0, shard_count=1, read_options=pygrain.ReadOptions())
    default_bps = time_batches(lambda: next(it_default), args.loader_batches)
    tokens = manifest.split_tokens("train")
    rng = np.random.default_rng(0)
    windows = loader.num_windows(len(tokens), args.max_length, config.data.stride)

    def plain_batch():
      starts = rng.integers(0, windows, args.batch_size) * config.data.stride
      w = np.stack([np.asarray(tokens[s:s + args.max_length + 1], dtype=np.int32) for s in starts])
      return {"inputs": w[:, :-1], "targets": w[:, 1:]}

    plain_bps = time_batches(plain_batch, args.loader_batches)
    print(f"loader ({args.batch_size}x{args.max_length}, {args.loader_workers} workers): {grain_bps:8.1f} batches/s "
          f"= {grain_bps * args.batch_size * args.max_length / 1e6:.2f} M tokens/s; plain numpy {plain_bps:8.1f} "
          f"batches/s (ratio {grain_bps / plain_bps:.2f}); Grain default read options {default_bps:8.1f} batches/s "
          f"(ours {grain_bps / default_bps:.1f}x)")
    results.update({"loader_batches_s": grain_bps, "plain_batches_s": plain_bps, "grain_default_batches_s": default_bps,
                    "loader_workers": args.loader_workers, "batch": [args.batch_size, args.max_length]})
    if args.output:
      with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
