"""What a prepared data directory holds, recorded in `manifest.json` when preparation finishes.

Layout of data_dir:
  tokenizer.model, tokenizer.json   SentencePiece model and its special ids / sha256
  settings.json                     the data settings the directory was prepared with
  shards/NNNNNN.{train,val}.bin     token shards, one per unit of work (resume granularity);
                                    deleted once the splits and the manifest are written
  shards/NNNNNN.meta.npz            per-document statistics of a shard; written last = shard done
  train.bin, val.bin                each split's tokens as one flat array (EOS after every document)
  tune.bin                          the tuning split, only with data.tune_fraction > 0 (data/splits.py)
  documents.npz                     per-document statistics of the whole corpus (for the report)
  manifest.json                     this record (with a CRC-32 per 4 MiB chunk of the tokenizer,
                                    split and documents files, data/integrity.py); written last =
                                    directory complete. A manifest of an older version without some
                                    of these checksums is checked once as far as it allows
                                    (Manifest.load) and the checksums are added to it
  report.json, lengths.png          the data validation report

Token arrays are raw little-endian uint16 (uint32 when the vocabulary exceeds 65535), read as
`np.memmap`. Flat memory-mapped arrays rather than ArrayRecord: training windows are arbitrary
`(start, start + L + 1)` slices of one token stream at any stride, which a memmap serves with
one copy and no decoding, shared between loader worker processes through the page cache;
ArrayRecord stores opaque records whose boundaries would fix the windows at preparation time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from typing import Any

import numpy as np

from neon_qtg_jax.data import integrity
from neon_qtg_jax.data.sources import DataError

MANIFEST_FILE = "manifest.json"
SETTINGS_FILE = "settings.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def data_settings(config) -> dict[str, Any]:
  """The config fields a prepared directory depends on (by field name); other values are refused."""
  d = config.data
  return {
      "format_version": FORMAT_VERSION,
      "data.source": d.source,
      "data.paths": d.paths if d.source != "stdlib" else "",
      "data.text_field": d.text_field if d.source == "jsonl" else "",
      "data.text_split": d.text_split if d.source == "text" else "",
      "data.val_fraction": float(d.val_fraction),
      "data.max_documents": int(d.max_documents),
      "model.vocab_size": int(config.model.vocab_size),
      "data.tokenizer_model_type": d.tokenizer_model_type,
      "data.tokenizer_sample_sentences": int(d.tokenizer_sample_sentences),
  } | ({"data.tune_fraction": float(d.tune_fraction)} if d.tune_fraction > 0 else {})  # absent at 0: as before


@dataclasses.dataclass
class Manifest:
  data_dir: str
  settings: dict[str, Any]
  files: list[str]                 # input files, in reading order
  dtype: str                       # token dtype on disk
  tokenizer: dict[str, Any]        # TokenizerInfo fields (vocab_size, ids, sha256)
  documents: dict[str, int]        # per split ("tune" only when the directory has a tuning split)
  tokens: dict[str, int]           # per split, EOS separators included
  text_bytes: dict[str, int]       # UTF-8 bytes of the documents, per split
  num_shards: int
  issues: dict[str, Any]           # Issues.to_dict()
  timings: dict[str, float]        # seconds per phase of the run that finished the directory
  checksums: dict[str, Any] = dataclasses.field(default_factory=dict)  # file -> integrity.file_checksums

  def fingerprint(self) -> dict[str, Any]:
    """What identifies the data a run trained and was scored on: the tokenizer's sha256 and the documents,
    tokens and UTF-8 bytes per split. Equal settings can prepare other data elsewhere (another Python's
    standard library, another version of a package's text, another SentencePiece)."""
    return {"tokenizer_sha256": self.tokenizer["sha256"], "documents": dict(self.documents),
            "tokens": dict(self.tokens), "text_bytes": dict(self.text_bytes)}

  def split_path(self, split: str) -> str:
    if split not in self.tokens:
      raise ValueError(f"split {split!r}: {self.data_dir} holds {tuple(self.tokens)}"
                       + (" (prepare with data.tune_fraction > 0 for a tuning split)" if split == "tune" else ""))
    return os.path.join(self.data_dir, f"{split}.bin")

  def split_tokens(self, split: str) -> np.memmap:
    """The split's tokens, read-only, shape (tokens[split],)."""
    n = self.tokens[split]
    if n == 0:
      return np.zeros((0,), dtype=self.dtype)
    return np.memmap(self.split_path(split), dtype=self.dtype, mode="r", shape=(n,))

  def save(self) -> None:
    body = dataclasses.asdict(self)
    del body["data_dir"]
    fd, tmp = tempfile.mkstemp(prefix=MANIFEST_FILE + ".", suffix=".tmp", dir=self.data_dir)  # several writers
    with os.fdopen(fd, "w") as f:
      json.dump(body, f, indent=2)
    os.replace(tmp, os.path.join(self.data_dir, MANIFEST_FILE))

  @classmethod
  def load(cls, data_dir: str) -> "Manifest":
    path = os.path.join(data_dir, MANIFEST_FILE)
    if not os.path.exists(path):
      raise DataError(f"{path}: no prepared data here; run launch.py --mode=prepare with this config first")
    with open(path) as f:
      body = json.load(f)
    fields = {f.name for f in dataclasses.fields(cls)} - {"data_dir"}
    if set(body) | {"checksums"} != fields or body.get("settings", {}).get("format_version") != FORMAT_VERSION:
      raise DataError(f"{path}: written by another version of neon_qtg_jax (fields {sorted(set(body) ^ fields)} "
                      f"differ); prepare again into an empty data.data_dir")
    manifest = cls(data_dir=data_dir, **body)
    for split in manifest.tokens:
      expected = manifest.tokens[split] * np.dtype(manifest.dtype).itemsize
      split_path = manifest.split_path(split)
      size = os.path.getsize(split_path) if os.path.exists(split_path) else -1
      if size != expected:
        raise DataError(f"{split_path}: {size} bytes, manifest says {expected}; the directory is damaged, "
                        f"prepare again into an empty data.data_dir")
    unrecorded = [name for name in integrity.CHECKED_FILES if name not in manifest.checksums]
    if unrecorded:
      manifest.record_checksums(unrecorded)
    integrity.verify(data_dir, manifest.checksums, full=False)
    return manifest

  def record_checksums(self, names: list[str]) -> None:
    """Checks files an older manifest has no checksums for, once, and adds their checksums to it.

    What can be checked without them: the tokenizer files against the manifest's record of the
    tokenizer (sha256, ids), and each split against documents.npz (an EOS after every document's
    recorded length and nowhere else, every id below the vocabulary). DataError naming the file
    when a check fails or the manifest cannot be rewritten.
    """
    path = os.path.join(self.data_dir, MANIFEST_FILE)
    log = logging.getLogger(__name__)
    log.warning("%s: no checksums for %s (an older version prepared it); checking them once and recording them",
                path, ", ".join(names))
    for name in names:
      self._check_unrecorded(name)
    self.checksums.update({name: integrity.file_checksums(os.path.join(self.data_dir, name)) for name in names})
    try:
      self.save()
    except OSError as err:
      raise DataError(f"{path}: cannot record the checksums of {', '.join(names)} ({err}); make the directory "
                      "writable for one run, or prepare again into an empty data.data_dir") from err
    log.warning("%s: %s checked and their checksums recorded", path, ", ".join(names))

  def _check_unrecorded(self, name: str) -> None:
    path = os.path.join(self.data_dir, name)
    damaged = f"{path}: does not match the manifest's record of it; the directory is damaged, prepare again " \
              "into an empty data.data_dir"
    if not os.path.exists(path):
      raise DataError(f"{path}: missing; prepare again into an empty data.data_dir")
    if name == "tokenizer.model":
      from neon_qtg_jax.data.tokenizer import file_sha256
      if file_sha256(path) != self.tokenizer["sha256"]:
        raise DataError(damaged + " (sha256)")
    elif name == "tokenizer.json":
      with open(path) as f:
        if json.load(f) != self.tokenizer:
          raise DataError(damaged)
    elif name == "documents.npz":
      is_val = self._document_stats()["is_val"]
      if {"train": int((~is_val).sum()), "val": int(is_val.sum())} != self.documents:
        raise DataError(damaged + " (documents per split)")
    elif name.endswith(".bin") and name[:-4] in SPLITS:
      self._check_split(name[:-4], damaged)
    else:
      raise DataError(f"{path}: no check for this file")

  def _document_stats(self) -> dict[str, np.ndarray]:
    with np.load(os.path.join(self.data_dir, "documents.npz")) as z:
      return {k: z[k] for k in ("num_tokens", "is_val")}

  def _check_split(self, split: str, damaged: str, chunk: int = 1 << 24) -> None:
    """An EOS exactly after each document of the split (lengths from documents.npz), every id below the vocabulary."""
    stats = self._document_stats()
    lengths = stats["num_tokens"][stats["is_val"] == (split == "val")]
    tokens = self.split_tokens(split)
    eos, vocab = self.tokenizer["eos_id"], self.tokenizer["vocab_size"]
    ends = np.cumsum(lengths + 1) - 1
    if len(tokens) != (ends[-1] + 1 if len(ends) else 0):
      raise DataError(damaged + f" ({len(tokens)} tokens, the documents' lengths sum to {ends[-1] + 1 if len(ends) else 0})")
    eos_count = 0
    for start in range(0, len(tokens), chunk):
      block = np.asarray(tokens[start:start + chunk])
      if block.size and int(block.max()) >= vocab:
        raise DataError(damaged + f" (an id of {int(block.max())} in tokens {start}..{start + block.size - 1}, "
                                  f"vocabulary {vocab})")
      eos_count += int((block == eos).sum())
    if eos_count != len(ends) or not np.all(tokens[ends] == eos):
      raise DataError(damaged + " (end-of-document ids not where documents.npz puts them)")

  def verify(self) -> int:
    """Reads every recorded file whole against its checksums; returns the bytes checked. DataError on damage."""
    if not self.checksums:
      raise DataError(f"{os.path.join(self.data_dir, MANIFEST_FILE)}: no checksums recorded (prepared by an older "
                      "version); prepare again into an empty data.data_dir to get them")
    return integrity.verify(self.data_dir, self.checksums, full=True)
