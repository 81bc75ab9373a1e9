"""The data readers under random bytes, truncation and bad UTF-8 (hypothesis): no crash, every bad item counted.

Invariants checked on every input:
  JSONL: each non-blank line gives exactly one of a document, malformed_json, missing_field or
    empty_document; non_utf8 counts the lines that are not valid UTF-8.
  text:  a file is one document or one empty_document; non_utf8 iff the bytes are not UTF-8.
  OpenWebText: the documents read are a prefix of the archive's, and fewer than all means at
    least one truncated_archive issue.
"""

import io
import json
import lzma
import tarfile

from hypothesis import HealthCheck, example, given, settings, strategies as st

from neon_qtg_jax.data import sources
from neon_qtg_jax.data.sources import Issues

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PER_LINE = (sources.MALFORMED_JSON, sources.MISSING_FIELD, sources.EMPTY_DOCUMENT)


def _is_utf8(raw: bytes) -> bool:
  try:
    raw.decode("utf-8")
    return True
  except UnicodeDecodeError:
    return False


def _read_jsonl(tmp_path, raw: bytes):
  path = tmp_path / "fuzz.jsonl"
  path.write_bytes(raw)
  issues = Issues()
  return list(sources.read_jsonl_file(str(path), issues=issues)), issues


def _check_jsonl(raw: bytes, docs, issues) -> None:
  lines = [line for line in raw.split(b"\n") if line.strip()]
  assert len(docs) + sum(issues.counts.get(k, 0) for k in PER_LINE) == len(lines)
  assert issues.counts.get(sources.NON_UTF8, 0) == sum(not _is_utf8(line) for line in lines)


VALID_JSONL = b"".join(json.dumps({"text": f"document {i} caf\u00e9"}).encode() + b"\n" for i in range(6))


@FUZZ
@given(st.binary(max_size=400))
@example(b"[" * 50_000 + b"\n")                       # nesting past the recursion limit
@example(b'{"text": ' + b"1" * 5000 + b"}\n")         # an integer past the digit limit
@example(b'{"text": "\xff\xfe ok"}\n{"text": 3}\n[]\n{"text": "  "}\n')
def test_jsonl_random_bytes(tmp_path, raw):
  _check_jsonl(raw, *_read_jsonl(tmp_path, raw))


@FUZZ
@given(st.integers(0, len(VALID_JSONL)))
def test_jsonl_truncated_anywhere(tmp_path, cut):
  raw = VALID_JSONL[:cut]
  docs, issues = _read_jsonl(tmp_path, raw)
  _check_jsonl(raw, docs, issues)
  assert len(docs) >= raw.count(b"\n")  # every complete record survives the cut


@FUZZ
@given(st.integers(0, len(VALID_JSONL)), st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80"]))
def test_jsonl_bad_utf8_at_any_position(tmp_path, position, bad):
  raw = VALID_JSONL[:position] + bad + VALID_JSONL[position:]
  docs, issues = _read_jsonl(tmp_path, raw)
  _check_jsonl(raw, docs, issues)
  assert issues.counts.get(sources.NON_UTF8, 0) == 1


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["file", "blank_line"]))
def test_text_random_bytes(tmp_path, raw, split):
  path = tmp_path / "fuzz.txt"
  path.write_bytes(raw)
  issues = Issues()
  docs = list(sources.read_text_file(str(path), split=split, issues=issues))
  if split == "file":
    assert len(docs) + issues.counts.get(sources.EMPTY_DOCUMENT, 0) == 1
    assert (sources.NON_UTF8 in issues.counts) == (not _is_utf8(raw))
  else:
    blocks = [b for b in raw.replace(b"\r", b"").split(b"\n") if b.strip()]
    assert (len(docs) == 0) == (len(blocks) == 0)
  assert all(d.text.strip() for d in docs if split == "file")


def _owt_archive() -> tuple[bytes, list[str]]:
  """A plain tar (the subsets/ layout) of two .xz members, each a tar of one-document .txt files."""
  texts, outer_buffer = [], io.BytesIO()
  with tarfile.open(fileobj=outer_buffer, mode="w") as outer:
    for m in range(2):
      inner_buffer = io.BytesIO()
      with tarfile.open(fileobj=inner_buffer, mode="w") as inner:
        for i in range(3):
          text = f"member {m} document {i}\n\nsome text {'x' * 40}"
          texts.append(text)
          data = text.encode()
          info = tarfile.TarInfo(f"{m}_{i}.txt")
          info.size = len(data)
          inner.addfile(info, io.BytesIO(data))
      blob = lzma.compress(inner_buffer.getvalue())
      info = tarfile.TarInfo(f"urlsf_subset00-{m}_data.xz")
      info.size = len(blob)
      outer.addfile(info, io.BytesIO(blob))
  return outer_buffer.getvalue(), texts


OWT, OWT_TEXTS = _owt_archive()


def _read_owt(tmp_path, raw: bytes):
  path = tmp_path / "urlsf_subset00.tar"
  path.write_bytes(raw)
  issues = Issues()
  return [d.text for d in sources.read_openwebtext(str(path), issues=issues)], issues


@FUZZ
@given(st.integers(0, len(OWT)))
def test_openwebtext_truncated_anywhere(tmp_path, cut):
  texts, issues = _read_owt(tmp_path, OWT[:cut])
  assert texts == OWT_TEXTS[:len(texts)]
  if len(texts) < len(OWT_TEXTS):
    assert issues.counts.get(sources.TRUNCATED_ARCHIVE, 0) >= 1


@FUZZ
@given(st.integers(0, len(OWT) - 1), st.integers(1, 255))
def test_openwebtext_flipped_byte(tmp_path, position, flip):
  raw = bytearray(OWT)
  raw[position] ^= flip
  texts, issues = _read_owt(tmp_path, bytes(raw))  # must not raise
  assert len(texts) <= len(OWT_TEXTS)
  if not texts:
    assert issues.total >= 1


@FUZZ
@given(st.binary(max_size=2000))
def test_openwebtext_random_bytes(tmp_path, raw):
  texts, issues = _read_owt(tmp_path, raw)
  assert issues.total >= 1 or texts == []  # nothing readable is always reported
