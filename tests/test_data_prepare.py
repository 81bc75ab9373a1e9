"""Preparation: exact token streams, deterministic hash split, idempotent reruns, resume, bad input, report."""

import concurrent.futures
import io
import json
import os
import pathlib
import random
import re
import tarfile

import numpy as np
import pytest

from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.data import integrity, prepare, sources
from neon_qtg_jax.data import tokenizer as tokenizer_module
from neon_qtg_jax.data.manifest import Manifest
from neon_qtg_jax.data.prepare import document_hash, prepare_dataset, validation_mask
from neon_qtg_jax.data.sources import DataError
from neon_qtg_jax.data.tokenizer import Tokenizer, sample_sentences

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu naïve café".split()


def write_corpus(root, num_docs: int = 60, seed: int = 0) -> list[str]:
  """num_docs text files doc_NNN.txt; returns their texts in file order."""
  rng = random.Random(seed)
  os.makedirs(root, exist_ok=True)
  texts = []
  for i in range(num_docs):
    lines = ["\t" * rng.randint(0, 2) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
             for _ in range(rng.randint(1, 6))]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(root, f"doc_{i:03d}.txt"), "w", encoding="utf-8") as f:
      f.write(text)
    texts.append(text)
  return texts


def make_config(tmp_path, paths, source="text", **data):
  c = default_config()
  c.model.vocab_size = 400
  c.data.source = source
  c.data.paths = str(paths)
  c.data.data_dir = str(tmp_path / "data")
  c.data.val_fraction = 0.25
  c.data.tokenizer_sample_sentences = 2000
  c.data.max_length = 16
  c.data.stride = 8
  for k, v in data.items():
    c.data[k] = v
  return validate(c)


def documents_of(tokens: np.ndarray, eos: int) -> list[list[int]]:
  ends = np.flatnonzero(tokens == eos)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [tokens[s:e].tolist() for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("prep")
  texts = write_corpus(tmp_path / "corpus")
  config = make_config(tmp_path, tmp_path / "corpus")
  return config, texts, prepare_dataset(config, progress=False, num_processes=1)


def test_splits_hold_every_document_exactly_once(prepared):
  config, texts, manifest = prepared
  tok = Tokenizer.load(config.data.data_dir)
  val = validation_mask(np.array([document_hash(t) for t in texts], dtype=np.uint64), 0.25)
  for split, mask in (("train", ~val), ("val", val)):
    tokens = np.asarray(manifest.split_tokens(split))
    assert tokens[-1] == tok.eos_id
    decoded = [tok.decode(doc) for doc in documents_of(tokens, tok.eos_id)]
    assert decoded == [t for t, m in zip(texts, mask) if m]
    assert manifest.documents[split] == int(mask.sum())
  assert 0 < manifest.documents["val"] < manifest.documents["train"]


@pytest.mark.parametrize("tune_fraction", [0.0, 0.25])
def test_tokenizer_sample_holds_train_documents_only(tmp_path, monkeypatch, tune_fraction):
  texts = write_corpus(tmp_path / "corpus", num_docs=40, seed=3)
  seen = []

  def recording_sample(documents, *args, **kwargs):
    documents = list(documents)
    seen.extend(doc.text for doc in documents)
    return sample_sentences(documents, *args, **kwargs)

  monkeypatch.setattr(prepare, "sample_sentences", recording_sample)
  manifest = prepare_dataset(make_config(tmp_path, tmp_path / "corpus", tune_fraction=tune_fraction),
                             progress=False, num_processes=1)
  val = validation_mask(np.array([document_hash(t) for t in texts], dtype=np.uint64), 0.25)
  assert manifest.documents["val"] == int(val.sum()) > 0
  u = np.array([document_hash(t) for t in texts], dtype=np.uint64) / 2.0**64
  train = u >= 0.25 + tune_fraction   # neither validation nor tuning text shapes the vocabulary
  assert sorted(seen) == sorted(t for t, m in zip(texts, train) if m) and 0 < len(seen) < len(texts)


def _copy_prepared(prepared, tmp_path) -> str:
  config, _, _ = prepared
  copy = str(tmp_path / "data")
  import shutil
  shutil.copytree(config.data.data_dir, copy)
  return copy


@pytest.mark.parametrize("name", ["train.bin", "val.bin", "documents.npz", "tokenizer.model", "tokenizer.json"])
def test_a_flipped_byte_is_an_error_naming_the_file(prepared, tmp_path, name):
  copy = _copy_prepared(prepared, tmp_path)
  manifest = Manifest.load(copy)
  assert set(manifest.checksums) == {"train.bin", "val.bin", "documents.npz", "tokenizer.model", "tokenizer.json"}
  path = pathlib.Path(copy, name)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))
  with pytest.raises(DataError, match=rf"{name}: bytes 0\.\.\d+ do not match the manifest's checksum"):
    Manifest.load(copy)  # the fast check at every start: this file is one chunk


def test_a_replaced_tokenizer_is_an_error_at_load(prepared, tmp_path):
  # A changed model with its tokenizer.json updated to match: Tokenizer.load alone would accept it.
  copy = _copy_prepared(prepared, tmp_path)
  model, info = pathlib.Path(copy, "tokenizer.model"), pathlib.Path(copy, "tokenizer.json")
  model.write_bytes(model.read_bytes().replace(b"alpha", b"Alpha", 1))  # another piece: still a valid model
  record = json.loads(info.read_text())
  info.write_text(json.dumps(record | {"sha256": tokenizer_module.file_sha256(str(model))}))
  Tokenizer.load(copy)
  with pytest.raises(DataError, match=r"tokenizer\.(model|json): .*the manifest"):
    Manifest.load(copy)


def _strip_checksums(copy: str, names) -> dict:
  path = pathlib.Path(copy, "manifest.json")
  body = json.loads(path.read_text())
  body["checksums"] = {k: v for k, v in body["checksums"].items() if k not in names}
  if not body["checksums"]:
    del body["checksums"]  # as the first versions wrote it
  path.write_text(json.dumps(body))
  return body


@pytest.mark.parametrize("missing", [("tokenizer.model", "tokenizer.json"), integrity.CHECKED_FILES],
                         ids=["tokenizer only", "all"])
def test_an_older_manifest_is_checked_once_and_gets_its_checksums(prepared, tmp_path, missing, monkeypatch, caplog):
  copy = _copy_prepared(prepared, tmp_path)
  recorded = json.loads(pathlib.Path(copy, "manifest.json").read_text())["checksums"]
  _strip_checksums(copy, missing)
  with caplog.at_level("WARNING"):
    Manifest.load(copy)
  assert "checking them once" in caplog.text and "checksums recorded" in caplog.text
  assert json.loads(pathlib.Path(copy, "manifest.json").read_text())["checksums"] == recorded
  monkeypatch.setattr(Manifest, "_check_unrecorded", lambda self, name: pytest.fail(f"checked {name} again"))
  Manifest.load(copy)


def _flip_train_token(copy: str, position: int, value: int, dtype: str) -> None:
  tokens = np.memmap(os.path.join(copy, "train.bin"), dtype=dtype, mode="r+")
  tokens[position] = value
  tokens.flush()


@pytest.mark.parametrize("damage", ["tokenizer model", "tokenizer record", "id past the vocabulary", "EOS moved",
                                    "documents"])
def test_an_older_manifest_with_damaged_files_is_refused(prepared, tmp_path, damage):
  copy = _copy_prepared(prepared, tmp_path)
  manifest = Manifest.load(copy)
  eos = manifest.tokenizer["eos_id"]
  train = np.asarray(manifest.split_tokens("train"))
  if damage == "tokenizer model":
    path = pathlib.Path(copy, "tokenizer.model")
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
  elif damage == "tokenizer record":
    path = pathlib.Path(copy, "tokenizer.json")
    path.write_text(json.dumps(json.loads(path.read_text()) | {"eos_id": eos + 1}))
  elif damage == "id past the vocabulary":
    _flip_train_token(copy, 3, manifest.tokenizer["vocab_size"], manifest.dtype)
  elif damage == "EOS moved":
    first_eos = int(np.flatnonzero(train == eos)[0])
    _flip_train_token(copy, first_eos, train[first_eos - 1], manifest.dtype)
    _flip_train_token(copy, first_eos - 1, eos, manifest.dtype)
  else:
    stats = dict(np.load(os.path.join(copy, "documents.npz")))
    stats["is_val"] = np.zeros_like(stats["is_val"])
    np.savez(os.path.join(copy, "documents.npz"), **stats)
  body = _strip_checksums(copy, integrity.CHECKED_FILES)
  expected = {"tokenizer model": "tokenizer.model", "tokenizer record": "tokenizer.json",
              "id past the vocabulary": "train.bin", "EOS moved": "train.bin", "documents": "documents.npz"}[damage]
  with pytest.raises(DataError, match=rf"{re.escape(expected)}: does not match the manifest's record"):
    Manifest.load(copy)
  assert json.loads(pathlib.Path(copy, "manifest.json").read_text()) == body  # nothing recorded


def test_an_older_manifest_that_cannot_be_rewritten_is_refused(prepared, tmp_path, monkeypatch):
  copy = _copy_prepared(prepared, tmp_path)
  _strip_checksums(copy, integrity.CHECKED_FILES)

  def read_only(self):
    raise PermissionError(13, "Permission denied", os.path.join(self.data_dir, "manifest.json"))

  monkeypatch.setattr(Manifest, "save", read_only)
  with pytest.raises(DataError, match="cannot record the checksums of tokenizer.model, .*make the directory writable"):
    Manifest.load(copy)


def test_prepare_verify_reads_every_chunk(tmp_path, monkeypatch, capsys):
  from neon_qtg_jax.cli import RunArgs
  from neon_qtg_jax.data import integrity
  monkeypatch.setattr(integrity, "CHUNK_BYTES", 64)  # many chunks: the fast check samples only some
  write_corpus(tmp_path / "corpus", num_docs=40, seed=5)
  config = make_config(tmp_path, tmp_path / "corpus")
  manifest = prepare_dataset(config, progress=False, num_processes=1)
  chunks = len(manifest.checksums["train.bin"]["crc32"])
  assert chunks > 8
  assert prepare.run(config, RunArgs(verify=True)) == 0
  assert "every checksum matches the manifest" in capsys.readouterr().out
  path = pathlib.Path(config.data.data_dir, "train.bin")
  data = bytearray(path.read_bytes())
  position = 64 * (chunks // 2) + 5  # a middle chunk
  data[position] ^= 0x80
  path.write_bytes(bytes(data))
  with pytest.raises(DataError, match=rf"train.bin: bytes {64 * (chunks // 2)}\.\.{64 * (chunks // 2) + 63} do not"):
    Manifest.load(config.data.data_dir).verify()
  # The fast check at load samples the first, the last and random chunks: make it miss this one.
  monkeypatch.setattr(integrity.random, "sample", lambda population, k: [])
  Manifest.load(config.data.data_dir)
  assert prepare.run(config, RunArgs(verify=True)) == 1
  assert "train.bin: bytes" in capsys.readouterr().err


def test_manifest_records_sources_counts_and_tokenizer(prepared):
  config, texts, manifest = prepared
  loaded = Manifest.load(config.data.data_dir)
  assert loaded == manifest
  assert len(loaded.files) == len(texts) and loaded.files == sorted(loaded.files)
  assert loaded.tokenizer["sha256"] == Tokenizer.load(config.data.data_dir).sha256
  assert loaded.dtype == "uint16"
  assert sum(loaded.text_bytes.values()) == sum(len(t.encode()) for t in texts)
  assert loaded.settings["data.val_fraction"] == 0.25


def test_rerun_returns_without_work(prepared):
  config, _, manifest = prepared
  paths = [os.path.join(config.data.data_dir, f) for f in ("train.bin", "val.bin", "manifest.json")]
  before = [os.stat(p).st_mtime_ns for p in paths]
  assert prepare_dataset(config, progress=False) == manifest
  assert [os.stat(p).st_mtime_ns for p in paths] == before


def test_split_does_not_depend_on_chunking_or_workers(tmp_path, monkeypatch, prepared):
  config, _, manifest = prepared
  monkeypatch.setattr(prepare, "CHUNK_BYTES", 500)   # many small shards
  other = make_config(tmp_path, config.data.paths)
  copy_tokenizer(config.data.data_dir, other.data.data_dir)  # same tokenizer: comparable token streams
  second = prepare_dataset(other, progress=False, num_processes=2)
  assert second.num_shards > manifest.num_shards
  for split in ("train", "val"):
    assert np.array_equal(second.split_tokens(split), manifest.split_tokens(split))


def test_duplicates_land_in_the_same_split():
  hashes = np.array([document_hash("same text"), document_hash("same text"), document_hash("other")],
                    dtype=np.uint64)
  mask = validation_mask(hashes, 0.5)
  assert mask[0] == mask[1]
  fractions = validation_mask(np.array([document_hash(str(i)) for i in range(4000)], dtype=np.uint64), 0.1)
  assert 0.08 < fractions.mean() < 0.12


class Interrupted(Exception):
  pass


def copy_tokenizer(src_dir, dst_dir):
  os.makedirs(dst_dir, exist_ok=True)
  for name in ("tokenizer.model", "tokenizer.json"):
    with open(os.path.join(src_dir, name), "rb") as f:
      data = f.read()
    with open(os.path.join(dst_dir, name), "wb") as f:
      f.write(data)


def test_interrupted_run_resumes_from_finished_shards(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, "CHUNK_BYTES", 400)
  write_corpus(tmp_path / "corpus", num_docs=40, seed=3)
  reference_config = make_config(tmp_path / "ref", tmp_path / "corpus")
  reference = prepare_dataset(reference_config, progress=False, num_processes=1)
  assert reference.num_shards >= 5
  assert not os.path.exists(os.path.join(reference_config.data.data_dir, "shards", "000000.train.bin"))

  config = make_config(tmp_path, tmp_path / "corpus")
  copy_tokenizer(reference_config.data.data_dir, config.data.data_dir)
  write_shard = prepare._write_shard

  def write_then_stop(shard_dir, index, *args):
    write_shard(shard_dir, index, *args)
    if index == 2:
      raise Interrupted

  monkeypatch.setattr(prepare, "_write_shard", write_then_stop)
  with pytest.raises(Interrupted):
    prepare_dataset(config, progress=False, num_processes=1)
  shard_dir = os.path.join(config.data.data_dir, "shards")
  finished = {f: os.stat(os.path.join(shard_dir, f)).st_mtime_ns for f in os.listdir(shard_dir)}
  assert sorted(finished) == [f"{i:06d}.{kind}" for i in range(3) for kind in ("meta.npz", "train.bin", "val.bin")] \
      + ["plan.json"]
  assert not os.path.exists(os.path.join(config.data.data_dir, "manifest.json"))

  written = []
  monkeypatch.setattr(prepare, "_write_shard", lambda d, index, *a: (written.append(index), write_shard(d, index, *a)))
  resumed = prepare_dataset(config, progress=False, num_processes=1)
  assert written == list(range(3, reference.num_shards))   # finished shards are not redone
  assert {f: os.stat(os.path.join(shard_dir, f)).st_mtime_ns for f in finished if f.endswith("meta.npz")} == \
      {f: t for f, t in finished.items() if f.endswith("meta.npz")}
  for split in ("train", "val"):
    assert np.array_equal(resumed.split_tokens(split), reference.split_tokens(split))
  assert resumed.documents == reference.documents


def test_changed_input_files_invalidate_unfinished_shards(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, "CHUNK_BYTES", 400)
  texts = write_corpus(tmp_path / "corpus", num_docs=30, seed=4)
  config = make_config(tmp_path, tmp_path / "corpus")
  write_shard = prepare._write_shard

  def write_then_stop(shard_dir, index, *args):
    write_shard(shard_dir, index, *args)
    if index == 1:
      raise Interrupted

  monkeypatch.setattr(prepare, "_write_shard", write_then_stop)
  with pytest.raises(Interrupted):
    prepare_dataset(config, progress=False, num_processes=1)
  monkeypatch.setattr(prepare, "_write_shard", write_shard)
  (tmp_path / "corpus" / "doc_000.txt").write_text("an edited first document\n", encoding="utf-8")
  manifest = prepare_dataset(config, progress=False, num_processes=1)
  tok = Tokenizer.load(config.data.data_dir)
  decoded = [tok.decode(d) for s in ("train", "val") for d in documents_of(np.asarray(manifest.split_tokens(s)),
                                                                           tok.eos_id)]
  assert "an edited first document\n" in decoded and texts[0] not in decoded


def test_changed_settings_are_refused_naming_the_field(prepared):
  config, _, _ = prepared
  changed = make_config(pathlib.Path(config.data.data_dir).parent, config.data.paths, val_fraction=0.5)
  with pytest.raises(DataError, match=r"data\.val_fraction"):
    prepare_dataset(changed, progress=False)


def test_max_documents_caps_the_corpus(tmp_path):
  write_corpus(tmp_path / "corpus", num_docs=30)
  manifest = prepare_dataset(make_config(tmp_path, tmp_path / "corpus", max_documents=7), progress=False,
                             num_processes=1)
  assert sum(manifest.documents.values()) == 7


def test_bad_input_is_counted_in_manifest_and_report(tmp_path):
  path = tmp_path / "train.jsonl"
  good = [json.dumps({"text": f"record {i} " + " ".join(WORDS[i % 7:])}) for i in range(40)]
  bad = ['{"text": "broken', '{"other": 1}', '{"text": ""}', json.dumps({"text": "record 0 " + " ".join(WORDS)})]
  path.write_bytes(("\n".join(good + bad)).encode() + b'\n{"text": "bytes \xfe"}\n')
  config = make_config(tmp_path, f"{path},{tmp_path / 'missing.jsonl'}", source="jsonl")
  manifest = prepare_dataset(config, progress=False, num_processes=1)
  assert manifest.issues["counts"] == {sources.MALFORMED_JSON: 1, sources.MISSING_FIELD: 1,
                                       sources.EMPTY_DOCUMENT: 1, sources.NON_UTF8: 1, sources.MISSING_FILE: 1}
  assert manifest.issues["examples"][sources.MALFORMED_JSON][0].startswith(f"{path}:41")
  assert sum(manifest.documents.values()) == 42
  with open(os.path.join(config.data.data_dir, "report.json")) as f:
    report = json.load(f)
  assert report["documents"]["total"] == 42
  assert report["empty_documents_skipped"] == 1
  assert report["duplicate_documents"] == 1     # the last JSON record repeats record 0
  assert report["bad_input"]["counts"] == manifest.issues["counts"]
  assert report["tokens_per_document"]["p50"] > 0 and report["bytes_per_token"] > 1
  assert 0 <= report["byte_fallback_rate"] < 0.1
  assert os.path.getsize(os.path.join(config.data.data_dir, "lengths.png")) > 1000


def test_report_counts_duplicates(tmp_path):
  corpus = tmp_path / "corpus"
  texts = write_corpus(corpus, num_docs=20)
  for i in range(3):
    (corpus / f"zz_copy_{i}.txt").write_text(texts[i], encoding="utf-8")
  config = make_config(tmp_path, corpus)
  prepare_dataset(config, progress=False, num_processes=1)
  with open(os.path.join(config.data.data_dir, "report.json")) as f:
    assert json.load(f)["duplicate_documents"] == 3


def test_nothing_usable_is_a_clear_error(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "unterminated\n{"no_text": 1}\n')
  with pytest.raises(DataError, match="no usable documents") as err:
    prepare_dataset(make_config(tmp_path, path, source="jsonl"), progress=False, num_processes=1)
  assert "malformed_json: 1" in str(err.value) and "missing_field: 1" in str(err.value)
  with pytest.raises(DataError, match="no input files"):
    prepare_dataset(make_config(tmp_path / "x", tmp_path / "nowhere.jsonl", source="jsonl"), progress=False)


def _xz_member(texts):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:xz") as tar:
    for i, text in enumerate(texts):
      data = text.encode()
      info = tarfile.TarInfo(f"{i:07d}-x.txt")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def test_openwebtext_archive_prepares_in_workers(tmp_path):
  rng = random.Random(1)
  members = [[" ".join(rng.choice(WORDS) for _ in range(30)) + "\n\n\n\nend" for _ in range(15)] for _ in range(3)]
  (tmp_path / "subsets").mkdir()
  with tarfile.open(tmp_path / "subsets" / "urlsf_subset00.tar", "w") as tar:
    for m, texts in enumerate(members):
      blob = _xz_member(texts)
      info = tarfile.TarInfo(f"openwebtext/urlsf_subset00-{m}_data.xz")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  config = make_config(tmp_path, tmp_path / "subsets" / "*.tar", source="openwebtext")
  manifest = prepare_dataset(config, progress=False, num_processes=2)
  assert manifest.num_shards == 3 and sum(manifest.documents.values()) == 45
  tok = Tokenizer.load(config.data.data_dir)
  docs = documents_of(np.asarray(manifest.split_tokens("train")), tok.eos_id)
  assert all(tok.decode(d).endswith("\n\nend") for d in docs)


def test_concurrent_preparers_of_one_directory_do_the_work_once(tmp_path, monkeypatch):
  write_corpus(tmp_path / "corpus", num_docs=20, seed=5)
  config = make_config(tmp_path, tmp_path / "corpus")
  trained = []
  train = prepare.train_tokenizer
  monkeypatch.setattr(prepare, "train_tokenizer", lambda *a, **k: (trained.append(1), train(*a, **k))[1])
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda _: prepare_dataset(config, progress=False, num_processes=1), range(2)))
  assert trained == [1]
  assert results[0] == results[1]


@pytest.mark.slow
def test_tiny_config_prepares_the_stdlib_corpus(tmp_path):
  config = default_config()
  config.data.data_dir = str(tmp_path / "stdlib")
  manifest = prepare_dataset(validate(config), progress=False)
  assert manifest.tokenizer["vocab_size"] == config.model.vocab_size
  assert manifest.documents["val"] > 0 and manifest.tokens["train"] > 1_000_000
  assert len(manifest.files) == len(sources.stdlib_files())
  tok = Tokenizer.load(config.data.data_dir)
  with open(next(f for f in manifest.files if f.endswith("/os.py")), encoding="utf-8") as f:
    text = f.read()
  assert tok.decode(tok.encode(text)) == text


# The tuning split (data.tune_fraction, data/splits.py).

# sha256 of the files that `prepared` (60 documents, val_fraction 0.25, one process) wrote before the
# tuning split existed (commit f68168c): with tune_fraction = 0 the directory must not change.
BEFORE_TUNE_SPLIT = {
    "train.bin": "77233a062b3cd8609ed68909855c3889ac5213136214848e202dee46012ec828",
    "val.bin": "66389ef4378362ca7b37a5404782a695ea859c78b7567ed7a31eee3af0e6f687",
    "documents.npz": "7f144d2a87c4d67e042fab15ba53a7c209c724e953923209e06f86e6a07a8de7",
}


def test_no_tuning_split_leaves_the_directory_byte_identical(prepared):
  import hashlib
  config, _, manifest = prepared
  assert config.data.tune_fraction == 0.0
  data_dir = pathlib.Path(config.data.data_dir)
  assert {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in BEFORE_TUNE_SPLIT} \
      == BEFORE_TUNE_SPLIT
  assert "data.tune_fraction" not in json.loads((data_dir / "settings.json").read_text())
  assert not (data_dir / "tune.bin").exists() and not list((data_dir / "shards").glob("*.tune.bin"))
  assert set(manifest.documents) == set(manifest.tokens) == set(manifest.text_bytes) == {"train", "val"}
  assert list(manifest.checksums) == ["tokenizer.model", "tokenizer.json", "documents.npz", "train.bin", "val.bin"]
  assert sorted(np.load(data_dir / "documents.npz").files) == ["hash", "is_val", "num_bytes", "num_tokens",
                                                               "num_words"]


def _decoded_split(manifest, tok, split):
  return [tok.decode(doc) for doc in documents_of(np.asarray(manifest.split_tokens(split)), tok.eos_id)]


def test_tuning_split_comes_out_of_train_by_the_same_hash(prepared, tmp_path):
  config, texts, manifest = prepared
  tuned_config = make_config(tmp_path, config.data.paths, tune_fraction=0.3)
  copy_tokenizer(config.data.data_dir, tuned_config.data.data_dir)  # same tokenizer: comparable streams
  tuned = prepare_dataset(tuned_config, progress=False, num_processes=1)
  tok = Tokenizer.load(config.data.data_dir)
  u = np.array([document_hash(t) for t in texts], dtype=np.uint64) / 2.0**64
  expected = {"val": u < 0.25, "tune": (u >= 0.25) & (u < 0.55), "train": u >= 0.55}
  decoded = {s: _decoded_split(tuned, tok, s) for s in ("train", "val", "tune")}
  for split, mask in expected.items():
    assert decoded[split] == [t for t, m in zip(texts, mask) if m]
    assert tuned.documents[split] == int(mask.sum()) > 0
  # Disjoint, every document once; val exactly as without a tuning split; tune + train = the old train.
  assert sum(len(v) for v in decoded.values()) == len(texts) == len(set(texts))
  assert np.array_equal(tuned.split_tokens("val"), manifest.split_tokens("val"))
  assert sorted(decoded["train"] + decoded["tune"]) == sorted(_decoded_split(manifest, tok, "train"))
  assert list(tuned.checksums) == ["tokenizer.model", "tokenizer.json", "documents.npz", "train.bin", "val.bin",
                                   "tune.bin"]
  assert tuned.settings["data.tune_fraction"] == 0.3
  assert Manifest.load(tuned_config.data.data_dir) == tuned
  with np.load(os.path.join(tuned_config.data.data_dir, "documents.npz")) as z:
    assert np.array_equal(z["is_tune"], expected["tune"]) and np.array_equal(z["is_val"], expected["val"])
  # --mode=eval's stream of the tuning split; a directory without one says how to get it.
  from neon_qtg_jax.evaluation.perplexity import validation_stream
  stream, text_bytes, _ = validation_stream(tuned_config.data.data_dir, tok.eos_id, "tune")
  assert np.array_equal(stream[1:], tuned.split_tokens("tune")) and text_bytes == tuned.text_bytes["tune"]
  with pytest.raises(DataError, match=r"no prepared 'tune' split.*data\.tune_fraction > 0"):
    validation_stream(config.data.data_dir, tok.eos_id, "tune")
  # The settings fingerprint holds the fraction both ways: neither directory is reused for the other.
  with pytest.raises(DataError, match=r"data\.tune_fraction' = 0\.3, prepared with None"):
    prepare_dataset(make_config(pathlib.Path(config.data.data_dir).parent, config.data.paths, tune_fraction=0.3),
                    progress=False)
  with pytest.raises(DataError, match=r"data\.tune_fraction' = None, prepared with 0\.3"):
    prepare_dataset(make_config(tmp_path, config.data.paths), progress=False)


@pytest.mark.parametrize("val, tune", [(0.25, -0.1), (0.25, 0.75), (0.5, 0.6)])
def test_a_bad_tune_fraction_is_refused_naming_it(tmp_path, val, tune):
  from neon_qtg_jax.config import ConfigError
  with pytest.raises(ConfigError, match=r"data\.tune_fraction"):
    make_config(tmp_path, tmp_path, val_fraction=val, tune_fraction=tune)
