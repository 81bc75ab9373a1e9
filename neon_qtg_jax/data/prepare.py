"""Preparation: sources -> SentencePiece tokenizer -> token shards -> split files + manifest + report.

  manifest = prepare_dataset(config)     # idempotent; returns at once when already prepared

Work is cut into units (a chunk of at most CHUNK_BYTES of documents, or one `.xz` member of an
OpenWebText archive, decompressed in the worker). Worker processes on every core tokenize the
units; the main process writes each finished unit as a shard, in order. A shard whose meta file
exists is done: a rerun skips it without tokenizing, so an interrupted run resumes. Documents go
to train, val (or tune, with data.tune_fraction > 0; data/splits.py) by a hash of their text, so
the split does not depend on order, workers or reruns, and exact duplicates always land in the
same split.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import tqdm

from neon_qtg_jax.data import filters, integrity, plans
from neon_qtg_jax.data import sources as src
from neon_qtg_jax.data import splits as split_rule
from neon_qtg_jax.data.manifest import MANIFEST_FILE, SETTINGS_FILE, SPLITS, Manifest, data_settings, token_dtype
from neon_qtg_jax.data.sources import DataError, Issues
from neon_qtg_jax.data.tokenizer import Tokenizer, sample_sentences, train_tokenizer

CHUNK_BYTES = 4 << 20      # most text per unit of work for the document sources
MIN_CHUNK_BYTES = 256 << 10
PLAN_FILE = "plan.json"
DOC_FIELDS = ("hash", "num_tokens", "num_bytes", "num_words", "is_val")  # + "is_tune" with a tuning split


class Unit(NamedTuple):
  """One unit of work: documents already read, or one compressed OpenWebText member."""
  index: int
  documents: list[tuple[str, str]] | None   # (text, origin)
  xz_member: bytes | None
  where: str
  input_bytes: int                          # bytes of input it stands for (progress)


def document_hash(text: str) -> int:
  """64-bit hash of a document's UTF-8 text (split assignment and duplicate detection)."""
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def validation_mask(hashes: np.ndarray, val_fraction: float) -> np.ndarray:
  """True for documents in the validation split: hash / 2**64 < val_fraction. hashes: uint64 (N,)."""
  return split_rule.split_masks(hashes, val_fraction)["val"]


def train_documents(documents: Iterable[src.Document], val_fraction: float,
                    tune_fraction: float = 0.0) -> Iterator[src.Document]:
  """The documents the split assigns to train (the tokenizer's sample must not see validation or tuning)."""
  for doc in documents:
    if split_rule.split_masks(np.array([document_hash(doc.text)], dtype=np.uint64), val_fraction,
                              tune_fraction)["train"][0]:
      yield doc


# Worker side. Each worker process loads the tokenizer once.

_worker_tokenizer: Tokenizer | None = None


def _init_worker(data_dir: str) -> None:
  global _worker_tokenizer
  _worker_tokenizer = Tokenizer.load(data_dir)


def tokenize_documents(tokenizer: Tokenizer, texts: list[str], val_fraction: float, dtype: np.dtype,
                       tune_fraction: float = 0.0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Tokens per split (each document followed by EOS) and per-document statistics."""
  ids = [tokenizer.encode(t) for t in texts]  # faster than encode_batch with one thread
  hashes = np.array([document_hash(t) for t in texts], dtype=np.uint64)
  masks = split_rule.split_masks(hashes, val_fraction, tune_fraction)
  num_tokens = np.array([len(x) for x in ids], dtype=np.int64)
  split_tokens = {}
  for split, mask in masks.items():
    out = np.empty((int((num_tokens[mask] + 1).sum()),), dtype=dtype)
    pos = 0
    for i in np.flatnonzero(mask):
      n = num_tokens[i]
      out[pos:pos + n] = ids[i]      # list -> array slice converts in C
      out[pos + n] = tokenizer.eos_id
      pos += n + 1
    split_tokens[split] = out
  stats = {
      "hash": hashes,
      "num_tokens": num_tokens,
      "num_bytes": np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64),
      "num_words": np.array([len(t.split()) for t in texts], dtype=np.int64),
      **split_rule.mask_fields(masks),
  }
  return split_tokens, stats


def _work(unit: Unit, val_fraction: float, dtype: str, tune_fraction: float = 0.0) -> tuple[dict, dict, dict, float]:
  """Tokenizes one unit in a worker: (tokens per split, document stats, issues, CPU seconds)."""
  cpu = time.process_time()
  issues = Issues()
  if unit.xz_member is not None:
    docs = [d.text for d in src.read_document_tar(io.BytesIO(unit.xz_member), unit.where, issues)]
  else:
    docs = [text for text, _ in unit.documents]
  split_tokens, stats = tokenize_documents(_worker_tokenizer, docs, val_fraction, np.dtype(dtype), tune_fraction)
  return split_tokens, stats, issues.to_dict(), time.process_time() - cpu


# Main side.

def chunk_bytes(files: list[str]) -> int:
  """Text per unit for document sources: about 64 units for the corpus, within [MIN_CHUNK_BYTES, CHUNK_BYTES].

  Depends on the corpus only (never on the number of processes), so shards of an interrupted
  run line up with the units of the rerun."""
  total = sum(os.path.getsize(f) for f in files if os.path.exists(f))
  return min(CHUNK_BYTES, max(total // 64, MIN_CHUNK_BYTES))


def _units(config, files: list[str], issues: Issues, unit_bytes: int) -> Iterator[Unit]:
  """The corpus cut into units of work, in a fixed order."""
  d = config.data
  index = 0
  if d.source == "openwebtext":
    for path in files:
      for where, blob in src.iter_openwebtext_members(path, issues):
        yield Unit(index, None, blob, where, len(blob))
        index += 1
    return
  chunk: list[tuple[str, str]] = []
  size = 0
  for path in files:
    for doc in src.read_file(path, d.source, text_field=d.text_field, text_split=d.text_split, issues=issues):
      chunk.append((doc.text, doc.origin))
      size += len(doc.text)
      if size >= unit_bytes:
        yield Unit(index, chunk, None, chunk[0][1], size)
        index, chunk, size = index + 1, [], 0
  if chunk:
    yield Unit(index, chunk, None, chunk[0][1], size)


def _shard_paths(shard_dir: str, index: int) -> dict[str, str]:
  base = os.path.join(shard_dir, f"{index:06d}")
  return {"train": base + ".train.bin", "val": base + ".val.bin", split_rule.TUNE: base + ".tune.bin",
          "meta": base + ".meta.npz"}


def _write_shard(shard_dir: str, index: int, where: str, split_tokens: dict, stats: dict, issues: dict,
                 cpu_s: float) -> None:
  paths = _shard_paths(shard_dir, index)
  for split in split_tokens:
    split_tokens[split].tofile(paths[split] + ".tmp")
    os.replace(paths[split] + ".tmp", paths[split])
  with open(paths["meta"] + ".tmp", "wb") as f:
    np.savez(f, **stats, where=np.array(where), issues=np.array(json.dumps(issues)), cpu_s=np.array(cpu_s))
  os.replace(paths["meta"] + ".tmp", paths["meta"])  # last: marks the shard done


def _read_shard_meta(shard_dir: str, index: int, dtype: np.dtype) -> dict | None:
  """A finished shard's statistics, or None when its meta or a token file is missing or short."""
  paths = _shard_paths(shard_dir, index)
  if not os.path.exists(paths["meta"]):
    return None
  with np.load(paths["meta"]) as z:
    meta = {k: z[k] for k in z.files}
  for split, mask in split_rule.stats_masks(meta).items():
    expected = int((meta["num_tokens"][mask] + 1).sum()) * dtype.itemsize
    if not os.path.exists(paths[split]) or os.path.getsize(paths[split]) != expected:
      return None
  return meta


def _truncate(split_tokens: dict, stats: dict, keep: int, eos_id: int) -> tuple[dict, dict]:
  """The first `keep` documents of a unit (for data.max_documents)."""
  stats = {k: v[:keep] for k, v in stats.items()}
  out = {}
  for split, mask in split_rule.stats_masks(stats).items():
    n = int((stats["num_tokens"][mask] + 1).sum())   # + EOS
    out[split] = split_tokens[split][:n]
    assert n == 0 or out[split][-1] == eos_id
  return out, stats


def _ensure_settings(data_dir: str, settings: dict) -> None:
  path = os.path.join(data_dir, SETTINGS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    # Both ways: a key only one side has (the filter fields) is a difference too.
    changed = {k: (old.get(k), settings.get(k)) for k in {**old, **settings} if old.get(k) != settings.get(k)}
    if changed:
      fields = "; ".join(f"config field '{k}' = {b!r}, prepared with {a!r}" for k, (a, b) in changed.items())
      raise DataError(f"{data_dir} was prepared with other data settings ({fields}); "
                      f"set config.data.data_dir to a new directory or delete this one")
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(settings, f, indent=2)
  os.replace(path + ".tmp", path)


def _ensure_shard_plan(shard_dir: str, files: list[str], tokenizer_sha256: str, progress: bool) -> None:
  """Shards are reused only for the same input files (names, sizes, mtimes) and tokenizer; else removed."""
  plan = {"tokenizer_sha256": tokenizer_sha256,
          "files": [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.exists(f)]}
  plans.keep_or_reset(shard_dir, PLAN_FILE, plan, "the input files or tokenizer changed since these shards were "
                      "written; tokenizing again", progress)


def _num_processes() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _log(progress: bool, message: str) -> None:
  if progress:
    print(message, file=sys.stderr, flush=True)


def prepare_dataset(config, *, progress: bool = True, num_processes: int | None = None) -> Manifest:
  """Prepares config.data.data_dir (tokenizer, shards, splits, manifest, report) and returns its manifest.

  Idempotent: a finished directory returns at once; an interrupted one resumes at its first
  unfinished shard. Raises DataError when the sources hold no usable document, or when
  data_dir was prepared with other data settings.
  """
  settings = {**data_settings(config), **filters.filter_settings(config)}
  if os.path.exists(os.path.join(config.data.data_dir, MANIFEST_FILE)) and not config.data.filters_preview_only:
    _ensure_settings(config.data.data_dir, settings)  # raises, naming the fields that differ
    return Manifest.load(config.data.data_dir)
  if filters.filter_settings(config):
    # Seconds on a sample before anything is written: stops here when the filters would remove most of it.
    filters.preview(config, src.source_files(config.data.source, config.data.paths, Issues()), progress=progress)
  with _exclusive(config.data.data_dir):  # a second process preparing the same directory waits, then returns
    _ensure_settings(config.data.data_dir, settings)
    if os.path.exists(os.path.join(config.data.data_dir, MANIFEST_FILE)):
      return Manifest.load(config.data.data_dir)
    return _prepare(config, settings, progress, num_processes)


@contextlib.contextmanager
def _exclusive(data_dir: str) -> Iterator[None]:
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(config, settings: dict, progress: bool, num_processes: int | None) -> Manifest:
  d = config.data
  data_dir = d.data_dir
  timings: dict[str, float] = {}
  clock = time.perf_counter()
  issues = Issues()
  files = src.source_files(d.source, d.paths, issues)
  if not files:
    raise DataError(f"data.source={d.source!r}, data.paths={d.paths!r}: no input files\n{issues.summary()}")
  # data.filters: a datatrove pass; from here on `config` reads the kept documents (data/filters.py)
  config, files = filters.filter_corpus(config, files, issues, progress=progress, num_processes=num_processes)
  d = config.data

  try:
    tokenizer = Tokenizer.load(data_dir)
  except DataError:
    _log(progress, f"tokenizer: sampling {d.tokenizer_sample_sentences} lines from {len(files)} file(s)")
    sample_issues = Issues()  # the full pass below counts bad input once
    docs = train_documents(src.documents_from_config(d, sample_issues), d.val_fraction, d.tune_fraction)
    sentences = sample_sentences(docs, d.tokenizer_sample_sentences, seed=config.data.shuffle_seed,
                                 progress=progress)
    if not sentences:
      raise DataError(f"data.source={d.source!r}, data.paths={d.paths!r}: no usable documents\n"
                      f"{sample_issues.summary()}")
    tokenizer = train_tokenizer(sentences, data_dir, vocab_size=config.model.vocab_size,
                                model_type=d.tokenizer_model_type, progress=progress)   # TRAIN_THREADS: same file anywhere
    _log(progress, f"tokenizer: {tokenizer.vocab_size} pieces ({d.tokenizer_model_type}) trained on "
                   f"{len(sentences)} lines in {time.perf_counter() - clock:.1f}s -> {tokenizer.path}")
  if tokenizer.vocab_size > config.model.vocab_size:
    raise DataError(f"{tokenizer.path}: {tokenizer.vocab_size} pieces exceed model.vocab_size="
                    f"{config.model.vocab_size}")

  timings["tokenizer_s"], clock = time.perf_counter() - clock, time.perf_counter()
  dtype = token_dtype(config.model.vocab_size)
  shard_dir = os.path.join(data_dir, "shards")
  _ensure_shard_plan(shard_dir, files, tokenizer.sha256, progress)
  num_shards, timings["worker_cpu_s"], timings["main_cpu_tokenize_s"] = _tokenize_to_shards(
      config, files, tokenizer, shard_dir, dtype, issues, progress, num_processes or _num_processes())
  timings["tokenize_s"], clock = time.perf_counter() - clock, time.perf_counter()
  names = split_rule.split_names(d.tune_fraction)
  _merge_splits(data_dir, shard_dir, num_shards, dtype, names)
  stats = _load_document_stats(data_dir)
  masks = split_rule.stats_masks(stats)
  documents = {s: int(masks[s].sum()) for s in names}
  if sum(documents.values()) == 0:
    raise DataError(f"data.source={d.source!r}, data.paths={d.paths!r}: no usable documents in "
                    f"{len(files)} file(s)\n{issues.summary()}")
  tokens = {s: os.path.getsize(os.path.join(data_dir, f"{s}.bin")) // dtype.itemsize for s in names}
  manifest = Manifest(
      data_dir=data_dir, settings=settings, files=files, dtype=dtype.name, tokenizer=vars(tokenizer.info).copy(),
      documents=documents, tokens=tokens,
      text_bytes={s: int(stats["num_bytes"][masks[s]].sum()) for s in names},
      num_shards=num_shards, issues=issues.to_dict(), timings=timings,
      checksums=integrity.directory_checksums(data_dir, integrity.checked_files(names)))
  timings["merge_s"], clock = time.perf_counter() - clock, time.perf_counter()
  from neon_qtg_jax.data.report import write_report
  write_report(manifest, progress=progress)
  timings["report_s"] = time.perf_counter() - clock
  manifest.save()   # last: the directory is complete
  _remove_shard_tokens(shard_dir, num_shards)
  _log(progress, f"prepared {data_dir}: documents {documents}, tokens {tokens}, {num_shards} shard(s)\n"
                 f"{issues.summary()}")
  if documents["val"] == 0:
    _log(progress, f"warning: no document fell into the validation split (data.val_fraction={d.val_fraction}); "
                   f"evaluation on the prepared split will fail")
  if documents.get(split_rule.TUNE) == 0:
    _log(progress, f"warning: no document fell into the tuning split (data.tune_fraction={d.tune_fraction}); "
                   f"--eval_split=tune will fail")
  return manifest


def _tokenize_to_shards(config, files, tokenizer, shard_dir, dtype, issues, progress, num_processes):
  """Tokenizes every unit not yet on disk into shards.

  Returns (shards in the corpus, worker CPU seconds, main-process CPU seconds)."""
  d = config.data
  total_bytes = sum(os.path.getsize(f) for f in files if os.path.exists(f))
  bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress,
                  mininterval=1.0, file=sys.stderr)
  docs_done = text_bytes = skipped = 0
  cpu_total, main_cpu = 0.0, time.process_time()
  started = time.time()
  units = _units(config, files, issues, chunk_bytes(files))
  context = multiprocessing.get_context("spawn")  # no fork: the caller may hold JAX threads
  with concurrent.futures.ProcessPoolExecutor(num_processes, mp_context=context, initializer=_init_worker,
                                              initargs=(d.data_dir,)) as pool:
    pending: collections.deque = collections.deque()
    num_shards = 0
    exhausted = False

    def finish(unit: Unit, result) -> bool:
      """Writes or accounts one unit; False once data.max_documents is reached."""
      nonlocal docs_done, text_bytes, num_shards, cpu_total
      if isinstance(result, dict):       # already on disk
        stats = {k: result[k] for k in _doc_fields(result)}
        issues.merge(Issues.from_dict(json.loads(str(result["issues"]))))
        cpu_total += float(result["cpu_s"])
      else:
        split_tokens, stats, unit_issues, cpu_s = result
        if d.max_documents and docs_done + len(stats["hash"]) > d.max_documents:
          split_tokens, stats = _truncate(split_tokens, stats, d.max_documents - docs_done, tokenizer.eos_id)
        _write_shard(shard_dir, unit.index, unit.where, split_tokens, stats, unit_issues, cpu_s)
        issues.merge(Issues.from_dict(unit_issues))
        cpu_total += cpu_s
      num_shards = unit.index + 1
      docs_done += len(stats["hash"])
      text_bytes += int(stats["num_bytes"].sum())
      bar.update(unit.input_bytes)
      elapsed = max(time.time() - started, 1e-9)
      bar.set_postfix_str(f"{docs_done / elapsed:.0f} docs/s, {text_bytes / elapsed / 1e6:.1f} MB/s text"
                          + (f", {skipped} shard(s) done before" if skipped else ""), refresh=False)
      return not (d.max_documents and docs_done >= d.max_documents)

    try:
      while True:
        while not exhausted and len(pending) < 2 * num_processes:   # bounded read-ahead
          unit = next(units, None)
          if unit is None:
            exhausted = True
            break
          meta = _read_shard_meta(shard_dir, unit.index, dtype)
          if meta is not None:
            skipped += 1
            pending.append((unit, None, meta))
          else:
            pending.append((unit, pool.submit(_work, unit, d.val_fraction, dtype.name, d.tune_fraction), None))
        if not pending:
          break
        unit, future, meta = pending.popleft()
        if not finish(unit, meta if future is None else future.result()):
          break
    finally:
      # Queued units are dropped at once (on max_documents, an error or Ctrl-C); finished shards stay.
      pool.shutdown(wait=False, cancel_futures=True)
  bar.close()
  return num_shards, cpu_total, time.process_time() - main_cpu


def _doc_fields(meta) -> tuple[str, ...]:
  return DOC_FIELDS + (("is_tune",) if "is_tune" in meta else ())


def _merge_splits(data_dir: str, shard_dir: str, num_shards: int, dtype: np.dtype,
                  names: tuple[str, ...] = SPLITS) -> None:
  """Concatenates the shards into one NAME.bin per split and their stats into documents.npz."""
  for split in names:
    out_path = os.path.join(data_dir, f"{split}.bin")
    with open(out_path + ".tmp", "wb") as out:
      for index in range(num_shards):
        with open(_shard_paths(shard_dir, index)[split], "rb") as f:
          shutil.copyfileobj(f, out, 1 << 24)
    os.replace(out_path + ".tmp", out_path)
  fields = DOC_FIELDS + (("is_tune",) if split_rule.TUNE in names else ())
  stats = {k: [] for k in fields}
  for index in range(num_shards):
    meta = _read_shard_meta(shard_dir, index, dtype)
    for k in fields:
      stats[k].append(meta[k])
  merged = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in stats.items()}
  with open(os.path.join(data_dir, "documents.npz.tmp"), "wb") as f:
    np.savez(f, **merged)
  os.replace(os.path.join(data_dir, "documents.npz.tmp"), os.path.join(data_dir, "documents.npz"))


def _remove_shard_tokens(shard_dir: str, num_shards: int) -> None:
  """Frees the disk the shard token files take once train.bin / val.bin hold them (metas stay)."""
  for index in range(num_shards):
    for split in SPLITS + (split_rule.TUNE,):
      path = _shard_paths(shard_dir, index)[split]
      if os.path.exists(path):
        os.remove(path)


def _load_document_stats(data_dir: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(data_dir, "documents.npz")) as z:
    return {k: z[k] for k in z.files}


def run(config, args) -> int:
  """launch.py --mode=prepare: prepares config.data.data_dir and prints where everything went; --verify checks it."""
  try:
    manifest = prepare_dataset(config)
    if getattr(args, "verify", False):
      clock = time.perf_counter()
      checked = manifest.verify()
      print(f"verified {len(manifest.checksums)} files, {checked / 2**20:.1f} MiB, in "
            f"{time.perf_counter() - clock:.1f}s: every checksum matches the manifest")
  except filters.PreviewOnly:
    return 0
  except DataError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  print(f"data_dir {manifest.data_dir}: documents {manifest.documents}, tokens {manifest.tokens}, "
        f"vocab {manifest.tokenizer['vocab_size']}; report {os.path.join(manifest.data_dir, 'report.json')}")
  return 0
