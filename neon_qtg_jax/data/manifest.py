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
  manifest.json                     this record (with a CRC-32 per 4 MiB chunk of the files above,
                                    data/integrity.py); written last = directory complete
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
import os
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
    tmp = os.path.join(self.data_dir, MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
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
    integrity.verify(data_dir, manifest.checksums, full=False)  # older manifests have none to check
    return manifest

  def verify(self) -> int:
    """Reads every recorded file whole against its checksums; returns the bytes checked. DataError on damage."""
    if not self.checksums:
      raise DataError(f"{os.path.join(self.data_dir, MANIFEST_FILE)}: no checksums recorded (prepared by an older "
                      "version); prepare again into an empty data.data_dir to get them")
    return integrity.verify(self.data_dir, self.checksums, full=True)
