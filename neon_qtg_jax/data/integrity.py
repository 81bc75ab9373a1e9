"""Checksums of a prepared directory's data files, recorded in the manifest and checked when it is loaded.

Each file is cut into CHUNK_BYTES chunks with one CRC-32 each (zlib: several GB/s), so a check
can read a few chunks or all of them. Manifest.load runs the fast check on every start (sizes,
plus the first, the last and SAMPLED_CHUNKS random chunks of each file); `launch.py --mode=prepare
--verify` reads everything. A mismatch is a DataError naming the file and its byte range.
"""

from __future__ import annotations

import os
import random
import zlib
from typing import Any, Iterable

from neon_qtg_jax.data.sources import DataError

CHUNK_BYTES = 4 << 20
# What runs read; in this order an older manifest's files are checked (documents.npz before the splits it describes).
CHECKED_FILES = ("tokenizer.model", "tokenizer.json", "documents.npz", "train.bin", "val.bin")
SAMPLED_CHUNKS = 2


def _chunk_crc(f, index: int, chunk_bytes: int) -> int:
  f.seek(index * chunk_bytes)
  return zlib.crc32(f.read(chunk_bytes))


def file_checksums(path: str, chunk_bytes: int | None = None) -> dict[str, Any]:
  """{"bytes", "chunk_bytes", "crc32": one per chunk} of one file."""
  chunk_bytes = chunk_bytes or CHUNK_BYTES
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    crcs = [_chunk_crc(f, i, chunk_bytes) for i in range(-(-size // chunk_bytes))]
  return {"bytes": size, "chunk_bytes": chunk_bytes, "crc32": crcs}


def checked_files(splits: Iterable[str]) -> tuple[str, ...]:
  """The files of a directory with these splits that the manifest checksums: CHECKED_FILES, then any other
  split (tune.bin)."""
  extra = tuple(f"{s}.bin" for s in splits if f"{s}.bin" not in CHECKED_FILES)
  return CHECKED_FILES + extra


def directory_checksums(data_dir: str, names: Iterable[str] = CHECKED_FILES) -> dict[str, dict[str, Any]]:
  return {name: file_checksums(os.path.join(data_dir, name)) for name in names}


def verify_file(path: str, record: dict[str, Any], chunks: Iterable[int] | None = None) -> int:
  """Checks `chunks` of one file (None: all) against its record; returns bytes read. DataError on a mismatch."""
  size = os.path.getsize(path) if os.path.exists(path) else -1
  if size != record["bytes"]:
    raise DataError(f"{path}: {size} bytes, the manifest says {record['bytes']}; the file is damaged: "
                    "prepare again into an empty data.data_dir")
  chunk_bytes, crcs = record["chunk_bytes"], record["crc32"]
  indices = range(len(crcs)) if chunks is None else sorted(set(chunks))
  with open(path, "rb") as f:
    for i in indices:
      crc = _chunk_crc(f, i, chunk_bytes)
      if crc != crcs[i]:
        end = min(size, (i + 1) * chunk_bytes) - 1
        raise DataError(f"{path}: bytes {i * chunk_bytes}..{end} do not match the manifest's checksum "
                        f"(crc32 {crc:08x}, recorded {crcs[i]:08x}); the file is damaged: prepare again into "
                        "an empty data.data_dir")
  return sum(min(chunk_bytes, size - i * chunk_bytes) for i in indices)


def verify(data_dir: str, checksums: dict[str, dict[str, Any]], *, full: bool) -> int:
  """Checks every recorded file: all chunks (full) or the first, last and a few random ones; returns bytes read."""
  checked = 0
  for name, record in sorted(checksums.items()):
    n = len(record["crc32"])
    chunks = None if full else [0, n - 1] + random.sample(range(n), min(SAMPLED_CHUNKS, n)) if n else []
    checked += verify_file(os.path.join(data_dir, name), record, chunks)
  return checked
