"""SentencePiece tokenizer that round-trips text exactly, and its training from a document stream.

Exactness comes from identity normalization, no dummy prefix, no whitespace collapsing and
byte fallback (any character outside the vocabulary becomes its UTF-8 bytes). Newline and tab
are user-defined pieces so code indentation and line breaks cost one token each. The one text
that cannot round-trip is U+2581 itself, which SentencePiece uses as its space marker.

Files in data_dir: `tokenizer.model` (the SentencePiece model) and `tokenizer.json` (special
ids, vocab size, sha256 of the model, training settings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import sys
import threading
import time
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
import tqdm

from neon_qtg_jax.data.sources import DataError, Document

MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer.json"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
USER_SYMBOLS = ("\n", "\t")
MAX_SENTENCE_BYTES = 4096  # SentencePiece skips longer training sentences; we cut them instead


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  unk_id: int
  sha256: str
  model_type: str
  sample_sentences: int


class Tokenizer:
  """A trained SentencePiece model with its special ids.

  tok = Tokenizer.load("data/stdlib")
  ids = tok.encode("def f(x):\\n\\treturn x")   # list[int], no BOS/EOS added
  assert tok.decode(ids) == "def f(x):\\n\\treturn x"
  """

  def __init__(self, path: str, info: TokenizerInfo):
    self.path = path
    self.info = info
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = info.bos_id, info.eos_id, info.pad_id, info.unk_id
    self.vocab_size = self._sp.get_piece_size()
    self.byte_ids = frozenset(i for i in range(self.vocab_size) if self._sp.is_byte(i))

  @classmethod
  def load(cls, data_dir: str) -> "Tokenizer":
    path = os.path.join(data_dir, MODEL_FILE)
    info_path = os.path.join(data_dir, INFO_FILE)
    if not (os.path.exists(path) and os.path.exists(info_path)):
      raise DataError(f"no tokenizer in {data_dir!r} ({MODEL_FILE} and {INFO_FILE}); "
                      f"run launch.py --mode=prepare with this config first")
    with open(info_path) as f:
      info = TokenizerInfo(**json.load(f))
    if file_sha256(path) != info.sha256:
      raise DataError(f"{path}: sha256 differs from {info_path}; the tokenizer was replaced, prepare again")
    return cls(path, info)

  @property
  def sha256(self) -> str:
    return self.info.sha256

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def sample_sentences(documents: Iterable[Document], num_sentences: int, *, seed: int = 0,
                     scan_factor: int = 4, scan_bytes: int = 256 << 20, progress: bool = False) -> list[str]:
  """A uniform reservoir sample of `num_sentences` non-blank lines.

  Memory stays at the sample. A corpus is read until both `scan_factor * num_sentences` lines
  and `scan_bytes` of text are seen: all of a small corpus, and only a prefix of a large one, so
  it is not read through just to train the tokenizer. Lines longer than MAX_SENTENCE_BYTES are
  cut at a character boundary.
  """
  rng = random.Random(seed)
  reservoir: list[str] = []
  seen = scanned = 0
  limit = scan_factor * num_sentences
  bar = tqdm.tqdm(unit=" lines", desc="tokenizer sample", disable=not progress, mininterval=2.0,
                  file=sys.stderr)
  for doc in documents:
    before = seen
    for line in doc.text.split("\n"):
      if not line.strip():
        continue
      line = line.encode("utf-8")[:MAX_SENTENCE_BYTES].decode("utf-8", errors="ignore")
      if len(reservoir) < num_sentences:
        reservoir.append(line)
      else:
        j = rng.randrange(seen + 1)
        if j < num_sentences:
          reservoir[j] = line
      seen += 1
    bar.update(seen - before)
    scanned += len(doc.text)
    if seen >= limit and scanned >= scan_bytes:
      break
  bar.close()
  return reservoir


@contextlib.contextmanager
def _heartbeat(message: str, every_s: float, enabled: bool) -> Iterator[None]:
  """Prints `message` with the elapsed time every `every_s` seconds while the body runs."""
  done = threading.Event()
  start = time.perf_counter()

  def beat() -> None:
    while not done.wait(every_s):
      print(f"{message}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

  if enabled:
    threading.Thread(target=beat, daemon=True).start()
  try:
    yield
  finally:
    done.set()


# SentencePiece splits the training work over this many threads whatever the cores (the scores depend on the
# split: 1 and 2 threads differ by ~2e-5), so that the model depends on the data alone.
TRAIN_THREADS = 16


def data_only(model: bytes) -> bytes:
  """A serialized SentencePiece model without its output path (trainer_spec.model_prefix), which SentencePiece
  records: the same corpus prepared in two directories gives the same tokenizer.model bytes and sha256."""
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  proto.trainer_spec.ClearField("model_prefix")
  return proto.SerializeToString(deterministic=True)


def train_tokenizer(sentences: Sequence[str], data_dir: str, *, vocab_size: int, model_type: str = "unigram",
                    num_threads: int | None = None, progress: bool = False) -> Tokenizer:
  """Trains SentencePiece on `sentences` and writes tokenizer.model / tokenizer.json to data_dir.

  The vocabulary may come out smaller than `vocab_size` on a tiny corpus (hard_vocab_limit off);
  it is never larger, so it fits a model built with `vocab_size`. `num_threads` (default TRAIN_THREADS, on
  any number of cores) changes the scores in their last digits: leave it for a file that depends on the data alone.
  """
  if not sentences:
    raise DataError("no text to train the tokenizer on")
  os.makedirs(data_dir, exist_ok=True)
  prefix = os.path.join(data_dir, "tokenizer.tmp")
  # One blocking call; SentencePiece's own log is a page per run, so a heartbeat line instead.
  with _heartbeat(f"tokenizer: training {model_type} on {len(sentences)} lines", 15.0, progress):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=0.9995,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(USER_SYMBOLS),
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        hard_vocab_limit=False,
        max_sentence_length=MAX_SENTENCE_BYTES,
        num_threads=num_threads or TRAIN_THREADS,
        minloglevel=2,
    )
  path = os.path.join(data_dir, MODEL_FILE)
  with open(prefix + ".model", "rb") as f:
    model = data_only(f.read())
  with open(prefix + ".model", "wb") as f:
    f.write(model)
  os.replace(prefix + ".model", path)
  os.remove(prefix + ".vocab")
  sp = spm.SentencePieceProcessor(model_file=path)
  info = TokenizerInfo(vocab_size=sp.get_piece_size(), bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id(),
                       unk_id=sp.unk_id(), sha256=file_sha256(path), model_type=model_type,
                       sample_sentences=len(sentences))
  tmp = os.path.join(data_dir, INFO_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(dataclasses.asdict(info), f, indent=2)
  os.replace(tmp, os.path.join(data_dir, INFO_FILE))  # written last: marks the tokenizer complete
  return Tokenizer(path, info)
