"""data.filters: the datatrove pre-filtering pass on a planted corpus (data/filters.py, data/filter_steps.py).

The planted corpus (data/planted.py) mixes clean prose from the `fortunes` package with exact
duplicates, near duplicates, repeated-line spam and very short documents; the filters must remove
>= 95% of each bad kind and keep >= 99% of the clean documents, the same ones for any number of
tasks, and a run killed with SIGKILL mid-filter must, rerun, keep exactly what an uninterrupted run keeps.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from neon_qtg_jax.config import ConfigError, default_config, validate
from neon_qtg_jax.data import filters, planted
from neon_qtg_jax.data.sources import DataError, Issues

needs_filters = pytest.mark.skipif(bool(filters.missing_packages()),
                                   reason=f"data.filters needs the `filters` extra: {filters.EXTRA}")
needs_fortunes = pytest.mark.skipif(not planted.fortunes_available(),
                                    reason="the planted corpus needs the Debian package `fortunes` (apt-get install fortunes)")

NUM_CLEAN, NUM_EACH = 60, 20   # all clean documents must stay (59/60 < 99%), at most one of each bad kind
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(path, planted documents): the planted corpus as JSONL, line n + 1 holding docs[n]."""
  if not planted.fortunes_available():
    pytest.skip("the planted corpus needs the Debian package `fortunes`")
  docs = planted.planted_corpus(num_clean=NUM_CLEAN, num_each=NUM_EACH, seed=0)
  path = str(tmp_path_factory.mktemp("planted") / "planted.jsonl")
  planted.write_jsonl(docs, path)
  return path, docs


@pytest.fixture(scope="module")
def fineweb_runs(corpus, tmp_path_factory):
  """{tasks: (filtered config, data_dir)}: the fineweb preset over the planted corpus with 1 and 3 tasks."""
  if filters.missing_packages():
    pytest.skip(f"data.filters needs the `filters` extra: {filters.EXTRA}")
  runs = {}
  for tasks in (1, 3):
    data_dir = str(tmp_path_factory.mktemp(f"fineweb{tasks}"))
    runs[tasks] = (run_filters(corpus[0], data_dir, tasks=tasks)[0], data_dir)
  return runs


def filter_config(path: str, data_dir: str, spec: str = "fineweb", tasks: int = 1):
  c = default_config()
  c.data.source, c.data.paths, c.data.data_dir = "jsonl", path, data_dir
  c.data.filters, c.data.filter_tasks = spec, tasks
  return validate(c)


def kept(config) -> list[tuple[str, str]]:
  """(id, text) of every kept document, in output order."""
  out = []
  for path in sorted(os.listdir(config.data.paths)):
    with open(os.path.join(config.data.paths, path)) as f:
      out.extend((r["id"], r["text"]) for r in map(json.loads, f))
  return out


def run_filters(path: str, data_dir: str, spec: str = "fineweb", tasks: int = 1, num_processes: int = 2):
  config = filter_config(path, data_dir, spec, tasks)
  issues = Issues()
  filtered, files = filters.filter_corpus(config, [path], issues, progress=False, num_processes=num_processes)
  return filtered, issues


def test_filter_spec_parsing_and_validation():
  assert filters.parse_filters("") == ()
  assert filters.parse_filters("fineweb") == filters.parse_filters("web_en") == filters.PRESETS["web_en"]
  assert filters.parse_filters("web") == ("language",) + filters.PRESETS["web_en"]
  assert filters.parse_filters("code") == ("code", "exact_dedup", "minhash")
  assert filters.parse_filters(" minhash , length") == ("minhash", "length")
  for bad, word in (("gopher", "unknown"), ("length,length", "more than once"), ("fineweb,length", "unknown")):
    c = default_config()
    c.data.filters = bad
    with pytest.raises(ConfigError, match=f"'data.filters'.*{word}"):
      validate(c)
  c = default_config()
  c.data.filter_max_words = c.data.filter_min_words
  with pytest.raises(ConfigError, match="data.filter_max_words"):
    validate(c)
  c = default_config()
  c.data.minhash_buckets = 0
  with pytest.raises(ConfigError, match="data.minhash_buckets"):
    validate(c)
  c = default_config()
  c.data.filter_tokenizer = "nltk"
  with pytest.raises(ConfigError, match="data.filter_tokenizer"):
    validate(c)


def test_filter_settings_fingerprint():
  c = default_config()
  assert filters.filter_settings(c) == {}     # unfiltered directories keep their old fingerprint
  c.data.filters = "length,minhash"
  c.data.filter_tasks = 7                     # not part of it: the kept documents do not depend on it
  assert filters.filter_settings(c) == {
      "data.filters": "length,minhash", "data.filter_tokenizer": "regex", "data.filter_min_words": 50,
      "data.filter_max_words": 100000, "data.minhash_ngrams": 5, "data.minhash_buckets": 14,
      "data.minhash_hashes_per_bucket": 8}
  c.data.filters = "gopher_quality"
  assert filters.filter_settings(c) == {"data.filters": "gopher_quality", "data.filter_tokenizer": "regex"}
  c.data.filters = "length,exact_dedup"     # no step reads words
  assert filters.filter_settings(c) == {"data.filters": "length,exact_dedup", "data.filter_min_words": 50,
                                        "data.filter_max_words": 100000}


def test_filter_missing_datatrove_names_field_and_extra(monkeypatch, tmp_path):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datatrove" else real(name, *a))
  config = filter_config(str(tmp_path / "x.jsonl"), str(tmp_path / "d"))
  with pytest.raises(DataError, match=r"'data.filters' = 'fineweb' needs the `filters` extra.*datatrove.*\.\[filters\]"):
    filters.filter_corpus(config, [], Issues(), progress=False)


def test_filter_7b_config_turns_filters_on():
  import configs.neon_qtg_7b as big
  import configs.neon_qtg_tiny as tiny
  assert filters.parse_filters(big.get_config().data.filters) == filters.PRESETS["web_en"]
  assert tiny.get_config().data.filters == ""


@needs_filters
def test_filter_task_range_contiguous_and_complete():
  from neon_qtg_jax.data.filter_steps import task_range
  rng = np.random.default_rng(0)
  for _ in range(50):
    weights = rng.integers(0, 1000, rng.integers(0, 40)).tolist()
    world = int(rng.integers(1, 12))
    ranges = [task_range(weights, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == len(weights)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))   # contiguous, in order, no overlap


@needs_filters
@needs_fortunes
def test_filter_regex_tokenizer_close_to_spacy():
  """The regex words the filters read by default against datatrove's spaCy tokenizer, on the planted prose:
  word counts within 3%, and the same Gopher quality verdict on every document."""
  from datatrove.data import Document
  from datatrove.pipeline.filters import GopherQualityFilter
  from datatrove.utils.word_tokenizers import load_word_tokenizer
  from neon_qtg_jax.data.filter_steps import RegexWordTokenizer
  docs = planted.planted_corpus(num_clean=40, num_each=8, seed=3)
  regex_tok, spacy_tok = RegexWordTokenizer(), load_word_tokenizer("eng")
  for doc in docs:
    a, b = len(regex_tok.word_tokenize(doc.text)), len(spacy_tok.word_tokenize(doc.text))
    assert abs(a - b) <= 0.03 * b + 1, (a, b, doc.text[:200])
  verdicts = [[GopherQualityFilter(language=lang).filter(Document(d.text, "x")) is True for d in docs]
              for lang in (regex_tok, "eng")]
  assert verdicts[0] == verdicts[1]


@needs_filters
def test_dedup_exact_find_keeps_first_in_corpus_order(tmp_path):
  """ExactDedupFind against a plain dict of first occurrences, random hashes split over random task counts."""
  from neon_qtg_jax.data.filter_steps import ExactDedupFind
  rng = np.random.default_rng(1)
  for trial in range(5):
    hashes = rng.integers(0, 40, 300).astype(np.uint64)   # many collisions
    cuts = np.sort(rng.integers(0, len(hashes), int(rng.integers(0, 6))))
    per_task = np.split(hashes, cuts)
    src_dir, out_dir = tmp_path / f"h{trial}", tmp_path / f"r{trial}"
    src_dir.mkdir()
    for r, h in enumerate(per_task):
      np.save(src_dir / f"{r:05d}.npy", h)
    ExactDedupFind(str(src_dir), str(out_dir), len(per_task)).run()
    seen, expected = set(), []
    for h in hashes.tolist():
      expected.append(h in seen)
      seen.add(h)
    removed = np.zeros(len(hashes), bool)
    start = 0
    for r, h in enumerate(per_task):
      removed[start + np.load(out_dir / f"{r:05d}.npy")] = True
      start += len(h)
    assert removed.tolist() == expected


@needs_filters
@needs_fortunes
def test_filters_remove_planted_documents_same_for_any_task_count(corpus, fineweb_runs):
  path, docs = corpus
  (one, one_dir), (three, three_dir) = fineweb_runs[1], fineweb_runs[3]
  assert kept(one) == kept(three)            # same documents, same order, same text
  assert one.data.source == "jsonl" and one.data.text_field == "text"
  kinds = collections.Counter(docs[int(doc_id.rsplit(":", 1)[1]) - 1].kind for doc_id, _ in kept(one))
  total = collections.Counter(d.kind for d in docs)
  for kind in ("exact_duplicate", "near_duplicate", "spam", "short"):
    assert 1 - kinds[kind] / total[kind] >= 0.95, (kind, kinds)
  assert kinds["clean"] / total["clean"] >= 0.99, kinds
  summary = filters.load_summary(one_dir)
  removed = {step: m["docs_removed"] for step, m in summary["removed"].items()}
  assert list(removed) == list(filters.PRESETS["web_en"])
  assert summary["documents_in"] == len(docs) and summary["documents_out"] == len(kept(one))
  assert sum(removed.values()) == len(docs) - len(kept(one))
  # each planted kind is removed by the step meant for it
  assert removed["length"] >= 0.95 * NUM_EACH and removed["gopher_repetition"] >= 0.95 * NUM_EACH
  assert removed["exact_dedup"] >= 0.95 * NUM_EACH and removed["minhash"] >= 0.95 * NUM_EACH
  for step in ("length", "gopher_repetition", "exact_dedup", "minhash"):
    examples = summary["removed"][step]["examples"]
    assert len(examples) == 3 and all(len(e["text"]) <= 163 and e["origin"].startswith(path) for e in examples)
  assert summary["removed"]["minhash"]["reasons"] == {"near_duplicate": removed["minhash"]}
  assert filters.load_summary(three_dir)["removed"] == summary["removed"]
  assert summary["bad_input"]["counts"] == {}


@needs_filters
@needs_fortunes
def test_filter_rerun_resumes_from_completion_markers(corpus, tmp_path):
  path, _ = corpus
  first, _ = run_filters(path, str(tmp_path / "d"), spec="length,exact_dedup", tasks=2)
  marker = os.path.join(str(tmp_path / "d"), "filter", "01_filter", "completions", "00000")
  assert os.path.exists(marker)
  before = os.stat(os.path.join(first.data.paths, "00000.jsonl")).st_mtime_ns
  again, _ = run_filters(path, str(tmp_path / "d"), spec="length,exact_dedup", tasks=2)
  assert kept(again) == kept(first)
  assert os.stat(os.path.join(again.data.paths, "00000.jsonl")).st_mtime_ns == before   # not run again
  # another task count is another plan: filtering starts over, with the same result
  other, _ = run_filters(path, str(tmp_path / "d"), spec="length,exact_dedup", tasks=3)
  assert kept(other) == kept(first)


def tensorboard_texts(logdir: str) -> dict[str, str]:
  """Text summaries in the event files of logdir."""
  from test_train_resume import tensorboard_events
  return {value.tag: value.tensor.string_val[0].decode() for event in tensorboard_events(logdir)
          for value in event.summary.value if value.tensor.string_val}


KILL_SCRIPT = """
import sys
from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.data import filters
from neon_qtg_jax.data.sources import Issues
c = default_config()
c.data.source, c.data.paths, c.data.data_dir = "jsonl", sys.argv[1], sys.argv[2]
c.data.filters, c.data.filter_tasks = "fineweb", 3
filters.filter_corpus(validate(c), [sys.argv[1]], Issues(), progress=False, num_processes=2)
"""


@needs_filters
@needs_fortunes
def test_filter_kill9_mid_filter_then_rerun_is_identical(corpus, fineweb_runs, tmp_path):
  path, _ = corpus
  reference, reference_dir = fineweb_runs[3]
  data_dir = str(tmp_path / "killed")
  root = os.path.join(data_dir, "filter")
  env = {**os.environ, "PYTHONPATH": REPO}
  proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, path, data_dir], env=env, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300

  def completions() -> int:
    if not os.path.isdir(root):
      return 0
    return sum(len(os.listdir(os.path.join(root, s, "completions"))) for s in os.listdir(root)
               if os.path.isdir(os.path.join(root, s, "completions")))

  while completions() < 1 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
  os.killpg(proc.pid, signal.SIGKILL)          # the run and its datatrove workers, mid-filter
  proc.wait()
  proc.stderr.close()
  # It was interrupted: no summary yet. (Which tasks had finished varies: the two worker processes take the
  # tasks in no fixed order, so checking for one task's completion marker raced.)
  assert filters.load_summary(data_dir) is None
  resumed, _ = run_filters(path, data_dir, tasks=3)
  assert kept(resumed) == kept(reference)
  ref_summary, summary = filters.load_summary(reference_dir), filters.load_summary(data_dir)
  assert summary["removed"] == ref_summary["removed"]


@needs_filters
@needs_fortunes
def test_filter_prepare_end_to_end_report_and_fingerprint(corpus, tmp_path):
  """prepare_dataset with data.filters: kept documents tokenized, removals in report.json, filters.png and
  TensorBoard text, bad input still counted with its line, and a directory filtered otherwise refused."""
  from neon_qtg_jax.data.prepare import prepare_dataset
  path, docs = corpus
  with_bad = str(tmp_path / "with_bad.jsonl")
  with open(path) as f, open(with_bad, "w") as out:
    out.write(f.read() + '{"text": "broken\n' + json.dumps({"text": "   "}) + "\n")
  config = filter_config(with_bad, str(tmp_path / "prepared"), spec="length,gopher_repetition,exact_dedup")
  config.model.vocab_size = 512
  config.data.tokenizer_sample_sentences = 3000
  manifest = prepare_dataset(config, progress=False, num_processes=2)
  clean_or_near = sum(d.kind in ("clean", "near_duplicate") for d in docs)
  assert sum(manifest.documents.values()) == clean_or_near
  report = json.load(open(os.path.join(manifest.data_dir, "report.json")))
  assert report["filters"]["removed"]["length"]["docs_removed"] == NUM_EACH
  assert report["filters"]["removed"]["exact_dedup"]["docs_removed"] == NUM_EACH
  bad = report["bad_input"]["counts"]
  assert bad == {"empty_document": 1, "malformed_json": 1}
  assert report["bad_input"]["examples"]["malformed_json"][0].startswith(f"{with_bad}:{len(docs) + 1}:")
  assert os.path.getsize(os.path.join(manifest.data_dir, "filters.png")) > 10000
  text = tensorboard_texts(os.path.join(manifest.data_dir, "tensorboard"))["data_report/text_summary"]
  assert "gopher_repetition" in text and "docs removed" in text
  config.data.filters = "length,exact_dedup"
  with pytest.raises(DataError, match="'data.filters' = 'length,exact_dedup', prepared with "
                                      "'length,gopher_repetition,exact_dedup'"):
    prepare_dataset(config, progress=False)
  config.data.filters = ""
  with pytest.raises(DataError, match="'data.filters' = None, prepared with"):
    prepare_dataset(config, progress=False)


FAKE_SBATCH = """#!/bin/bash
# Stands in for SLURM's sbatch: runs the job script at once, once per array index, and prints a job id.
script="${@: -1}"
for arg in "$@"; do case "$arg" in --export=*RUN_OFFSET=*) export RUN_OFFSET="${arg##*RUN_OFFSET=}";; esac; done
echo "$@" >> "$FAKE_SLURM_LOG"
array=$(sed -n 's/^#SBATCH --array=0-\\([0-9]*\\).*/\\1/p' "$script")
for i in $(seq 0 "${array:-0}"); do
  SLURM_ARRAY_TASK_ID=$i SLURM_NODELIST=localhost bash "$script" >> "$FAKE_SLURM_LOG.out" 2>&1 || exit 1
done
echo "Submitted batch job $RANDOM"
"""
FAKE_SRUN = """#!/bin/bash
while [ "$1" != launch_pickled_pipeline ]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo localhost
"""


@needs_filters
@needs_fortunes
def test_filter_slurm_executor_then_prepare_picks_up_its_output(corpus, tmp_path, monkeypatch):
  """submit_to_slurm through datatrove's SlurmPipelineExecutor (sbatch, srun and scontrol stand-ins run each
  array task here): one job per stage, chained by dependencies; filter_corpus then finds every stage complete and reads
  the same kept documents as a local run. (Cheap steps: each array task here is a fresh Python process.)"""
  path, _ = corpus
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
    (bin_dir / name).write_text(body)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "sbatch.log"
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
  monkeypatch.setenv("PYTHONPATH", REPO)
  monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
  spec = "length,exact_dedup"
  local, _ = run_filters(path, str(tmp_path / "local"), spec=spec, tasks=1)
  config = filter_config(path, str(tmp_path / "cluster"), spec=spec, tasks=2)
  ids = filters.submit_to_slurm(config, partition="cpu", time_limit="01:00:00")
  assert len(ids) == 4
  submissions = log.read_text().splitlines()
  stage_jobs = [line for line in submissions if "RUN_OFFSET" in line]
  assert len(stage_jobs) == 4 and sum("--dependency=afterok" in line for line in stage_jobs) == 3   # chained
  root = filters.filter_root(config.data.data_dir)
  for stage in sorted(os.listdir(root)):
    if stage[:2].isdigit():
      assert os.path.exists(os.path.join(root, stage, "launch_script.slurm"))
  filtered, _ = filters.filter_corpus(config, [path], Issues(), progress=False)
  assert all(s["seconds"] is None for s in filters.load_summary(config.data.data_dir)["stages"])   # nothing rerun
  assert kept(filtered) == kept(local)


@needs_filters
@needs_fortunes
def test_filter_openwebtext_members_split_over_tasks(corpus, tmp_path):
  """A plain OpenWebText subset tar is split per .xz member over tasks; the kept documents do not depend on
  the task count, and a non-.xz member is reported as bad input, as without filters."""
  import io
  import tarfile
  from neon_qtg_jax.data.filter_steps import plan_pieces

  _, docs = corpus

  def add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  path = str(tmp_path / "urlsf_subset00.tar")
  with tarfile.open(path, "w") as outer:
    for member in range(4):
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w:xz") as inner:
        for i, doc in enumerate(docs[member::4]):
          add(inner, f"{member}-{i:04d}.txt", doc.text.encode())
      add(outer, f"openwebtext/urlsf_subset00-{member}_data.xz", buf.getvalue())
    add(outer, "openwebtext/README", b"not a member")
  issues = Issues()
  assert len(plan_pieces([path], "openwebtext", issues)) == 5 and issues.total == 0
  results = []
  for tasks in (1, 3):
    config = filter_config(path, str(tmp_path / f"owt{tasks}"), spec="length,exact_dedup", tasks=tasks)
    config.data.source = "openwebtext"
    issues = Issues()
    filtered, _ = filters.filter_corpus(config, [path], issues, progress=False, num_processes=2)
    results.append(kept(filtered))
    assert issues.counts == {"unexpected_member": 1}, issues.counts
  assert results[0] == results[1]
  assert len(results[0]) == sum(d.kind in ("clean", "near_duplicate", "spam") for d in docs)
