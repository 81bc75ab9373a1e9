"""Document readers: OpenWebText archives, JSONL, plain text, and the Python standard library.

Every reader streams (archives are never unpacked to disk, files never read whole into a list)
and yields `Document`s. Bad input never stops a run and is never dropped silently: each reader
records it in an `Issues` tally with the file and line (or archive member) it came from.

  issues = Issues()
  for doc in iter_documents("jsonl", ["data/train.jsonl"], issues=issues):
    ...
  print(issues.summary())
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import lzma
import os
import re
import sys
import sysconfig
import tarfile
from typing import IO, Iterable, Iterator, Sequence

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
MAX_EXAMPLES_PER_KIND = 20

# Issue kinds, each counted separately.
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
NON_UTF8 = "non_utf8"                # bytes replaced by U+FFFD; the document is kept
NUL_BYTES = "nul_bytes"              # NUL bytes (binary data in a text) removed; the document is kept
EMPTY_DOCUMENT = "empty_document"    # nothing but whitespace; skipped
TRUNCATED_ARCHIVE = "truncated_archive"
UNEXPECTED_MEMBER = "unexpected_member"  # an archive member that is not an .xz document tar; skipped
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"      # exists but cannot be read (permissions, I/O error)

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_THREE_NEWLINES = re.compile(r"\n\n\n+")


class DataError(RuntimeError):
  """Nothing usable in the given sources, or a prepared directory that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  origin: str  # "path:line" or "archive:member/name": where the document starts


@dataclasses.dataclass
class Issues:
  """Counts of bad input by kind, with the first few locations of each."""
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def add(self, kind: str, where: str, detail: str = "") -> None:
    self.counts[kind] = self.counts.get(kind, 0) + 1
    shown = self.examples.setdefault(kind, [])
    if len(shown) < MAX_EXAMPLES_PER_KIND:
      shown.append(f"{where}: {detail}" if detail else where)

  def merge(self, other: "Issues") -> None:
    for kind, count in other.counts.items():
      self.counts[kind] = self.counts.get(kind, 0) + count
      shown = self.examples.setdefault(kind, [])
      shown.extend(other.examples.get(kind, [])[:MAX_EXAMPLES_PER_KIND - len(shown)])

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def to_dict(self) -> dict:
    return {"counts": dict(sorted(self.counts.items())), "examples": dict(sorted(self.examples.items()))}

  @classmethod
  def from_dict(cls, d: dict) -> "Issues":
    return cls(counts=dict(d.get("counts", {})), examples={k: list(v) for k, v in d.get("examples", {}).items()})

  def summary(self) -> str:
    if not self.counts:
      return "bad input: none"
    lines = [f"bad input: {self.total} item(s)"]
    for kind, count in sorted(self.counts.items()):
      lines.append(f"  {kind}: {count}")
      for where in self.examples.get(kind, [])[:5]:
        lines.append(f"    {where}")
      if count > 5:
        lines.append(f"    ... {count - 5} more")
    return "\n".join(lines)


def _decode(raw: bytes, where: str, issues: Issues, *, first_line: int = 1) -> str:
  """UTF-8 text; undecodable bytes become U+FFFD and NUL bytes are removed, each reported with its line."""
  if b"\0" in raw:
    nul = raw.index(b"\0")
    line = first_line + raw.count(b"\n", 0, nul)
    issues.add(NUL_BYTES, f"{where}:{line}", f"{raw.count(0)} NUL byte(s), the first at offset {nul}")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as err:
    line = first_line + raw.count(b"\n", 0, err.start)
    issues.add(NON_UTF8, f"{where}:{line}", f"byte 0x{raw[err.start]:02x} at offset {err.start}")
    text = raw.decode("utf-8", errors="replace")
  return text.replace("\0", "")


def _keep(text: str, where: str, issues: Issues) -> bool:
  if text.strip():
    return True
  issues.add(EMPTY_DOCUMENT, where)
  return False


def clean_openwebtext(text: str) -> str:
  """The usual OpenWebText cleanup: runs of 3+ newlines collapse to one blank line."""
  return _THREE_NEWLINES.sub("\n\n", text).strip()


def _is_separator(line: bytes, split: str) -> bool:
  """A blank line (split="blank_line"), or a line holding only "%" (split="percent_line", fortune files)."""
  if split == "percent_line":
    return line.rstrip(b"\r\n") == b"%"
  return not line.strip()


def read_text_file(path: str, *, split: str = "file", issues: Issues) -> Iterator[Document]:
  """One document per file (split="file"), or one per block between separator lines: blank lines
  (split="blank_line") or "%" lines (split="percent_line", the strfile format of fortune databases)."""
  with open(path, "rb") as f:
    if split == "file":
      text = _decode(f.read(), path, issues)
      if _keep(text, f"{path}:1", issues):
        yield Document(text, f"{path}:1")
      return
    # Stream the file line by line, one block in memory at a time.
    block: list[bytes] = []
    start = 1
    for lineno, line in enumerate(f, start=1):
      if not _is_separator(line, split):
        if not block and line.strip():
          start = lineno
        if block or line.strip():
          block.append(line)
      elif block:
        yield _block_document(block, path, start, issues)
        block = []
    if block:
      yield _block_document(block, path, start, issues)


def _block_document(block: list[bytes], path: str, start: int, issues: Issues) -> Document:
  text = _decode(b"".join(block), path, issues, first_line=start).rstrip("\r\n")
  return Document(text, f"{path}:{start}")


def read_jsonl_file(path: str, *, field: str = "text", issues: Issues) -> Iterator[Document]:
  """One document per line: the string in `field` of each JSON object."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      if not raw.strip():
        continue  # blank lines between records are not records
      line = _decode(raw, path, issues, first_line=lineno)
      try:
        record = json.loads(line)
      except json.JSONDecodeError as err:
        issues.add(MALFORMED_JSON, where, err.msg)
        continue
      except (ValueError, RecursionError) as err:  # a number past Python's digit limit, nesting past the stack
        issues.add(MALFORMED_JSON, where, f"{type(err).__name__}: {str(err)[:80]}")
        continue
      if not isinstance(record, dict) or field not in record:
        issues.add(MISSING_FIELD, where, f"no field {field!r}")
        continue
      text = record[field]
      if not isinstance(text, str):
        issues.add(MISSING_FIELD, where, f"field {field!r} is {type(text).__name__}, not a string")
        continue
      if _keep(text, where, issues):
        yield Document(text, where)


def _check_tar_end(tar: tarfile.TarFile, where: str, issues: Issues) -> None:
  """A streamed tar cut exactly at a member boundary reads as complete: report a missing end-of-archive block."""
  if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
    issues.add(TRUNCATED_ARCHIVE, where, f"no end-of-archive block after byte {tar.offset}: members may be missing")


def read_document_tar(fileobj: IO[bytes], where: str, issues: Issues, *, mode: str = "r|xz") -> Iterator[Document]:
  """Documents from one OpenWebText member: an xz-compressed tar of one-document .txt files.

  A truncated or corrupt member is reported with its name; documents read before the damage
  are kept.
  """
  try:
    with tarfile.open(fileobj=fileobj, mode=mode) as tar:
      for info in tar:
        if not info.isfile():
          continue
        name = f"{where}/{info.name}"
        data = tar.extractfile(info).read()
        text = clean_openwebtext(_decode(data, name, issues))
        if _keep(text, name, issues):
          yield Document(text, name)
      _check_tar_end(tar, where, issues)
  except (EOFError, lzma.LZMAError, tarfile.TarError, OSError) as err:
    issues.add(TRUNCATED_ARCHIVE, where, f"{type(err).__name__}: {err}")


def iter_openwebtext_members(path: str, issues: Issues) -> Iterator[tuple[str, bytes]]:
  """(member name, compressed bytes) of each `.xz` member of an OpenWebText archive.

  Handles `subsets/urlsf_subsetNN.tar` (plain tar of `.xz` members) and the older
  `openwebtext.tar.xz` (xz tar of `.xz` members). Members are read one at a time.
  """
  mode = "r|xz" if path.endswith((".xz", ".txz")) else "r|"
  try:
    with tarfile.open(path, mode=mode) as outer:
      for info in outer:
        if not info.isfile():
          continue
        where = f"{path}:{info.name}"
        if not info.name.endswith(".xz"):
          issues.add(UNEXPECTED_MEMBER, where, "not an .xz member; skipped")
          continue
        yield where, outer.extractfile(info).read()
      _check_tar_end(outer, path, issues)
  except (FileNotFoundError, IsADirectoryError) as err:
    issues.add(MISSING_FILE, path, str(err.strerror))
  except PermissionError as err:
    issues.add(UNREADABLE_FILE, path, str(err.strerror))
  except (EOFError, lzma.LZMAError, tarfile.TarError, OSError) as err:
    issues.add(TRUNCATED_ARCHIVE, path, f"{type(err).__name__}: {err}")


def read_openwebtext(path: str, *, issues: Issues) -> Iterator[Document]:
  """All documents of one OpenWebText archive (either layout), streamed."""
  for where, blob in iter_openwebtext_members(path, issues):
    yield from read_document_tar(io.BytesIO(blob), where, issues)


def stdlib_files() -> list[str]:
  """The running interpreter's standard library: `.py` sources (docstrings and
  `pydoc_data/topics.py` are its docs), plus `.txt`/`.rst` docs and the HTML-free text docs
  under `sys.prefix/share/doc/python*` when installed. Sorted; site-packages excluded."""
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
    found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith((".py",) + TEXT_SUFFIXES))
  version = f"{sys.version_info.major}.{sys.version_info.minor}"
  for docdir in (os.path.join(sys.prefix, "share", "doc", f"python{version}"), f"/usr/share/doc/python{version}"):
    for dirpath, dirnames, filenames in os.walk(docdir):
      dirnames.sort()
      found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(TEXT_SUFFIXES))
  return sorted(found)


def resolve_paths(paths: str | Sequence[str], suffixes: tuple[str, ...] | None, issues: Issues) -> list[str]:
  """Files named by comma-separated (or listed) files, directories and globs, sorted within each.

  Directories are walked for files ending in `suffixes` (all files when None); a name that
  matches nothing is reported as a missing file.
  """
  if isinstance(paths, str):
    paths = [p.strip() for p in paths.split(",")]
  files = []
  for spec in (p for p in paths if p):
    matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
    matches = [m for m in matches if os.path.exists(m)]
    if not matches:
      issues.add(MISSING_FILE, spec, "no such file or directory")
      continue
    for match in matches:
      if os.path.isdir(match):
        for dirpath, dirnames, filenames in os.walk(match):
          dirnames.sort()
          files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                       if suffixes is None or f.endswith(suffixes))
      else:
        files.append(match)
  return files


def source_files(source: str, paths: str | Sequence[str], issues: Issues) -> list[str]:
  """The input files of a configured source (data.source, data.paths)."""
  if source == "stdlib":
    return stdlib_files()
  suffixes = {"openwebtext": (".tar", ".xz"), "jsonl": JSONL_SUFFIXES, "text": TEXT_SUFFIXES}[source]
  return resolve_paths(paths, suffixes, issues)


def read_file(path: str, source: str, *, text_field: str = "text", text_split: str = "file",
              issues: Issues) -> Iterator[Document]:
  """Documents of one file of the given source kind; a missing or unreadable file is reported."""
  try:
    if source == "openwebtext":
      yield from read_openwebtext(path, issues=issues)
    elif source == "jsonl":
      yield from read_jsonl_file(path, field=text_field, issues=issues)
    else:
      yield from read_text_file(path, split=text_split, issues=issues)
  except (FileNotFoundError, IsADirectoryError) as err:
    issues.add(MISSING_FILE, path, str(err.strerror))
  except OSError as err:
    issues.add(UNREADABLE_FILE, path, f"{type(err).__name__}: {err.strerror or err}")


def guess_source(path: str) -> str:
  """The source kind of a single file by its name: jsonl, openwebtext or text."""
  if path.endswith(JSONL_SUFFIXES):
    return "jsonl"
  if path.endswith((".tar", ".tar.xz", ".txz")):
    return "openwebtext"
  return "text"


def iter_documents(source: str | None, paths: str | Sequence[str] = "", *, text_field: str = "text",
                   text_split: str = "file", issues: Issues | None = None,
                   max_documents: int = 0) -> Iterator[Document]:
  """Every document of a source in a fixed order.

  Args:
    source: "stdlib", "openwebtext", "jsonl", "text", or None to pick per file by its name
      (how the evaluator reads an arbitrary file).
    paths: comma-separated string or list of files, directories or globs (ignored for stdlib).
    issues: collects bad input; pass one in to read it afterwards.
    max_documents: stop after this many documents (0: all).
  """
  issues = issues if issues is not None else Issues()
  if source is None:
    files = resolve_paths(paths, None, issues)
  else:
    files = source_files(source, paths, issues)
  count = 0
  for path in files:
    for doc in read_file(path, source or guess_source(path), text_field=text_field, text_split=text_split,
                         issues=issues):
      yield doc
      count += 1
      if max_documents and count >= max_documents:
        return


def documents_from_config(data_config, issues: Issues) -> Iterable[Document]:
  """`iter_documents` with the fields of config.data."""
  return iter_documents(data_config.source, data_config.paths, text_field=data_config.text_field,
                        text_split=data_config.text_split, issues=issues,
                        max_documents=data_config.max_documents)
