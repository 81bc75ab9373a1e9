"""The tokenizer round-trips text exactly and records its special ids."""

import json
import os
import random

import pytest

from neon_qtg_jax.data.sources import DataError, Document
from neon_qtg_jax.data.tokenizer import EOS_ID, INFO_FILE, Tokenizer, sample_sentences, train_tokenizer

WORDS = ("the model reads tokens and writes text while the loader shuffles windows of data "
         "def return import class self value index count").split()


def corpus(num_docs: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  docs = []
  for _ in range(num_docs):
    lines = []
    for _ in range(rng.randint(2, 8)):
      indent = " " * rng.choice((0, 2, 4, 8))
      lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))))
    docs.append("\n".join(lines))
  return docs


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def tokenizer(request, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tok"))
  docs = [Document(t, f"doc{i}") for i, t in enumerate(corpus(300))]
  return train_tokenizer(sample_sentences(docs, 5000), data_dir, vocab_size=400, model_type=request.param,
                         num_threads=1)


ROUND_TRIP_TEXTS = [
    "def f(x):\n\treturn  x   # comment\n",
    "    indented\n\t\ttabbed\n\n\n  trailing spaces   \n",
    "\n\nleading newlines",
    " leading space",
    "naïve café, Grüße, 日本語のテキスト, emoji \U0001F600, math ∑ ≤ ∞",
    "windows\r\nline\r\nendings\r\n",
    "control\x00chars\x07 and \x1b[0m escapes",
    "",
    "   ",
    "mixed\t \t whitespace \n \n",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_exact_round_trip(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_of_unseen_characters_uses_byte_fallback(tokenizer):
  text = "Ωμέγα ᚠᚢᚦ"
  ids = tokenizer.encode(text)
  assert tokenizer.unk_id not in ids
  assert any(i in tokenizer.byte_ids for i in ids)
  assert tokenizer.decode(ids) == text


def test_newline_and_tab_are_single_tokens(tokenizer):
  assert len(tokenizer.encode("\n")) == 1
  assert len(tokenizer.encode("\t")) == 1


def test_special_ids_recorded_and_reloaded(tokenizer):
  data_dir = os.path.dirname(tokenizer.path)
  with open(os.path.join(data_dir, INFO_FILE)) as f:
    info = json.load(f)
  loaded = Tokenizer.load(data_dir)
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (info["bos_id"], info["eos_id"], info["pad_id"])
  assert loaded.eos_id == EOS_ID
  assert len({loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.unk_id}) == 4
  assert loaded.vocab_size == info["vocab_size"] <= 400
  assert loaded.encode("the model") == tokenizer.encode("the model")


def test_replaced_model_file_is_refused(tmp_path, tokenizer):
  data_dir = os.path.dirname(tokenizer.path)
  for name in ("tokenizer.model", INFO_FILE):
    with open(os.path.join(data_dir, name), "rb") as f:
      (tmp_path / name).write_bytes(f.read())
  (tmp_path / "tokenizer.model").write_bytes((tmp_path / "tokenizer.model").read_bytes() + b"\0")
  with pytest.raises(DataError, match="sha256"):
    Tokenizer.load(str(tmp_path))


def test_missing_tokenizer_names_directory(tmp_path):
  with pytest.raises(DataError, match=str(tmp_path)):
    Tokenizer.load(str(tmp_path))


def test_sample_is_bounded_and_deterministic():
  docs = [Document(t, str(i)) for i, t in enumerate(corpus(200))]
  a = sample_sentences(docs, 50, seed=1)
  b = sample_sentences(docs, 50, seed=1)
  assert a == b and len(a) == 50
  lines = {line for d in docs for line in d.text.split("\n")}
  assert set(a) <= lines


def test_sample_covers_a_small_corpus_and_only_a_prefix_of_a_large_one():
  docs = [Document(f"doc {i} line {j}", str(i)) for i in range(400) for j in range(5)]
  whole = sample_sentences(docs, 100, seed=0)
  assert max(int(line.split()[1]) for line in whole) > 300       # late documents are sampled too
  prefix = sample_sentences(iter(docs), 100, seed=0, scan_factor=2, scan_bytes=0)
  assert max(int(line.split()[1]) for line in prefix) < 200      # stops after 2 x 100 lines


def test_same_corpus_gives_identical_tokenizer_bytes_in_two_directories(tmp_path):
  """SentencePiece records its output path in the model; train_tokenizer leaves it out, and splits the work over
  TRAIN_THREADS threads on any number of cores, so the file depends on the data alone."""
  sentences = sample_sentences([Document(t, f"doc{i}") for i, t in enumerate(corpus(200, seed=5))], 3000)
  a = train_tokenizer(sentences, str(tmp_path / "a"), vocab_size=300)
  b = train_tokenizer(sentences, str(tmp_path / "elsewhere" / "b"), vocab_size=300)
  with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
    assert fa.read() == fb.read()
  assert a.sha256 == b.sha256
  with open(a.path, "rb") as f:
    assert str(tmp_path).encode() not in f.read()
