"""Readers: OpenWebText archives in both distributed layouts, JSONL, plain text, and every bad-input case."""

import io
import lzma
import tarfile

import pytest

from neon_qtg_jax.data import sources
from neon_qtg_jax.data.sources import Issues, iter_documents


def xz_tar_of_texts(texts: dict[str, str]) -> bytes:
  """An xz-compressed tar of one-document .txt files: one OpenWebText member."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:xz") as tar:
    for name, text in texts.items():
      data = text.encode("utf-8")
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def write_outer_tar(path, members: dict[str, bytes], mode: str) -> None:
  with tarfile.open(path, mode=mode) as tar:
    for name, blob in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))


MEMBER_A = {"0000001-aaa.txt": "First doc.\n\n\n\n\nAfter many newlines.\n",
            "0000002-bbb.txt": "Second doc with héllo."}
MEMBER_B = {"0000003-ccc.txt": "Third doc.\n\n\nEnd."}
EXPECTED = ["First doc.\n\nAfter many newlines.", "Second doc with héllo.", "Third doc.\n\nEnd."]


def test_openwebtext_subset_tar_layout(tmp_path):
  subsets = tmp_path / "subsets"
  subsets.mkdir()
  path = subsets / "urlsf_subset00.tar"
  write_outer_tar(path, {"openwebtext/urlsf_subset00-1_data.xz": xz_tar_of_texts(MEMBER_A),
                         "openwebtext/urlsf_subset00-2_data.xz": xz_tar_of_texts(MEMBER_B)}, "w")
  issues = Issues()
  docs = list(iter_documents("openwebtext", str(subsets / "*.tar"), issues=issues))
  assert [d.text for d in docs] == EXPECTED
  assert docs[0].origin == f"{path}:openwebtext/urlsf_subset00-1_data.xz/0000001-aaa.txt"
  assert issues.total == 0


def test_openwebtext_single_tar_xz_layout(tmp_path):
  path = tmp_path / "openwebtext.tar.xz"
  write_outer_tar(path, {"openwebtext/urlsf_subset00-1_data.xz": xz_tar_of_texts(MEMBER_A),
                         "openwebtext/urlsf_subset01-1_data.xz": xz_tar_of_texts(MEMBER_B)}, "w:xz")
  issues = Issues()
  assert [d.text for d in iter_documents("openwebtext", str(path), issues=issues)] == EXPECTED
  assert issues.total == 0


def test_truncated_xz_member_is_reported_and_reading_goes_on(tmp_path):
  good = xz_tar_of_texts(MEMBER_B)
  big = {f"{i:07d}.txt": f"document {i} " + "x" * 3000 + str(i) * 500 for i in range(20)}
  broken = xz_tar_of_texts(big)
  broken = broken[:len(broken) // 2]
  path = tmp_path / "urlsf_subset00.tar"
  write_outer_tar(path, {"openwebtext/broken.xz": broken, "openwebtext/good.xz": good}, "w")
  issues = Issues()
  texts = [d.text for d in iter_documents("openwebtext", str(path), issues=issues)]
  assert texts[-1] == EXPECTED[2]              # the member after the damaged one is read
  assert all(t.startswith("document ") for t in texts[:-1])  # complete files before the damage are kept
  assert len(texts) - 1 < len(big)
  assert issues.counts == {sources.TRUNCATED_ARCHIVE: 1}
  assert "openwebtext/broken.xz" in issues.examples[sources.TRUNCATED_ARCHIVE][0]


def test_truncated_outer_archive_and_stray_members_are_reported(tmp_path):
  path = tmp_path / "urlsf_subset00.tar"
  member_b = xz_tar_of_texts(MEMBER_B)
  write_outer_tar(path, {"openwebtext/a.xz": xz_tar_of_texts(MEMBER_A), "openwebtext/README": b"notes",
                         "openwebtext/b.xz": member_b}, "w")
  data = path.read_bytes()
  cut = data.index(b"openwebtext/b.xz") + 512 + len(member_b) // 2   # header block, then half of b
  path.write_bytes(data[:cut])
  issues = Issues()
  texts = [d.text for d in iter_documents("openwebtext", str(path), issues=issues)]
  assert texts == EXPECTED[:2]
  assert issues.counts == {sources.UNEXPECTED_MEMBER: 1, sources.TRUNCATED_ARCHIVE: 1}
  assert issues.examples[sources.UNEXPECTED_MEMBER][0].startswith(f"{path}:openwebtext/README")


def test_missing_openwebtext_archive_is_a_missing_file(tmp_path):
  issues = Issues()
  assert list(sources.read_file(str(tmp_path / "urlsf_subset99.tar"), "openwebtext", issues=issues)) == []
  assert issues.counts == {sources.MISSING_FILE: 1}


def test_jsonl_bad_lines_are_counted_with_line_numbers(tmp_path):
  path = tmp_path / "train.jsonl"
  lines = [
      b'{"text": "good one"}',
      b'{"text": "broken',                       # 2: malformed JSON
      b'{"body": "no text field"}',              # 3: missing field
      b'{"text": "bad byte \xff here"}',         # 4: non-UTF-8, kept with U+FFFD
      b'{"text": "   "}',                        # 5: empty document
      b'{"text": 42}',                           # 6: not a string
      b'',                                       # blank line: not a record
      b'{"text": "last good"}',                  # 8
  ]
  path.write_bytes(b"\n".join(lines) + b"\n")
  issues = Issues()
  docs = list(iter_documents("jsonl", str(path), issues=issues))
  assert [d.text for d in docs] == ["good one", "bad byte \ufffd here", "last good"]
  assert [d.origin for d in docs] == [f"{path}:1", f"{path}:4", f"{path}:8"]
  assert issues.counts == {sources.MALFORMED_JSON: 1, sources.MISSING_FIELD: 2, sources.NON_UTF8: 1,
                           sources.EMPTY_DOCUMENT: 1}
  assert issues.examples[sources.MALFORMED_JSON][0].startswith(f"{path}:2")
  assert issues.examples[sources.MISSING_FIELD][0].startswith(f"{path}:3")
  assert issues.examples[sources.NON_UTF8][0].startswith(f"{path}:4")
  assert issues.examples[sources.EMPTY_DOCUMENT][0] == f"{path}:5"
  assert issues.examples[sources.MISSING_FIELD][1].startswith(f"{path}:6")


def test_jsonl_field_name_is_configurable(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"content": "a"}\n{"content": "b"}\n')
  assert [d.text for d in iter_documents("jsonl", str(path), text_field="content")] == ["a", "b"]


def test_text_files_one_per_file_and_blank_line_split(tmp_path):
  (tmp_path / "a.txt").write_text("para one\nline two\n\n  \npara two\n")
  (tmp_path / "b.md").write_text("# title\n")
  (tmp_path / "skip.bin").write_text("not text")
  per_file = [d.text for d in iter_documents("text", str(tmp_path))]
  assert per_file == ["para one\nline two\n\n  \npara two\n", "# title\n"]
  issues = Issues()
  blocks = list(iter_documents("text", str(tmp_path), text_split="blank_line", issues=issues))
  assert [d.text for d in blocks] == ["para one\nline two", "para two", "# title"]
  assert blocks[1].origin == f"{tmp_path / 'a.txt'}:5"
  assert issues.total == 0


def test_percent_line_split_reads_fortune_files(tmp_path):
  path = tmp_path / "quotes"
  path.write_text("A banker lends you\n\nhis umbrella.\n\t\t-- Mark Twain\n%\n\n%\n\nSecond one.\n%\n")
  docs = list(iter_documents("text", str(path), text_split="percent_line"))
  assert [d.text for d in docs] == ["A banker lends you\n\nhis umbrella.\n\t\t-- Mark Twain", "Second one."]
  assert docs[1].origin == f"{path}:9"


def test_text_non_utf8_reported_with_line(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("line one\nline two caf".encode() + b"\xe9\n")
  issues = Issues()
  docs = list(iter_documents("text", str(path), issues=issues))
  assert docs[0].text == "line one\nline two caf\ufffd\n"
  assert issues.examples[sources.NON_UTF8][0].startswith(f"{path}:2")


def test_nul_bytes_in_a_text_are_counted_as_bad_input_and_removed(tmp_path):
  path = tmp_path / "binary.txt"
  path.write_bytes(b"line one\nline\x00 two\x00\n")
  issues = Issues()
  docs = list(iter_documents("text", str(path), issues=issues))
  assert docs[0].text == "line one\nline two\n"
  assert issues.counts == {sources.NUL_BYTES: 1}
  assert issues.examples[sources.NUL_BYTES][0].startswith(f"{path}:2: 2 NUL byte(s)")


def test_empty_text_file_is_counted(tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n")
  (tmp_path / "full.txt").write_text("content")
  issues = Issues()
  assert [d.text for d in iter_documents("text", str(tmp_path), issues=issues)] == ["content"]
  assert issues.counts == {sources.EMPTY_DOCUMENT: 1}


def test_missing_file_is_counted_and_others_read(tmp_path):
  (tmp_path / "ok.txt").write_text("present")
  issues = Issues()
  spec = f"{tmp_path / 'ok.txt'},{tmp_path / 'gone.txt'},{tmp_path / 'nothing*.txt'}"
  assert [d.text for d in iter_documents("text", spec, issues=issues)] == ["present"]
  assert issues.counts == {sources.MISSING_FILE: 2}
  assert str(tmp_path / "gone.txt") in issues.examples[sources.MISSING_FILE][0]


def test_single_file_reader_guesses_kind(tmp_path):
  (tmp_path / "e.jsonl").write_text('{"text": "json doc"}\n')
  (tmp_path / "e.txt").write_text("text doc")
  assert [d.text for d in iter_documents(None, str(tmp_path / "e.jsonl"))] == ["json doc"]
  assert [d.text for d in iter_documents(None, str(tmp_path / "e.txt"))] == ["text doc"]


def test_stdlib_corpus_is_present_and_sorted():
  files = sources.stdlib_files()
  assert files == sorted(files) and len(files) > 100
  assert any(f.endswith("os.py") for f in files)
  assert not any("site-packages" in f for f in files)


def test_max_documents_stops_reading(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(f'{{"text": "doc {i}"}}\n' for i in range(10)))
  assert len(list(iter_documents("jsonl", str(path), max_documents=3))) == 3


def test_issue_summary_names_kinds_and_places():
  issues = Issues()
  issues.add(sources.MALFORMED_JSON, "f.jsonl:3", "Expecting value")
  other = Issues()
  other.add(sources.TRUNCATED_ARCHIVE, "a.tar:m.xz")
  issues.merge(other)
  text = issues.summary()
  assert "malformed_json: 1" in text and "f.jsonl:3" in text and "a.tar:m.xz" in text
  assert Issues.from_dict(issues.to_dict()).counts == issues.counts


@pytest.mark.parametrize("blob", [b"", b"not xz at all", lzma.compress(b"xz but not a tar")[:10]])
def test_damaged_member_is_reported_not_raised(blob):
  issues = Issues()
  assert list(sources.read_document_tar(io.BytesIO(blob), "m.xz", issues)) == []
  assert issues.counts == {sources.TRUNCATED_ARCHIVE: 1}
  assert issues.examples[sources.TRUNCATED_ARCHIVE][0].startswith("m.xz: ")
