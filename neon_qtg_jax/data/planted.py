"""A planted corpus for checking `data.filters`: clean prose with known bad documents mixed in.

Clean documents are English prose from the Debian package `fortunes` (`apt-get install
fortunes`, no download at run time): the narrative quotations and anecdotes of the files in
PROSE_FILES, each fortune without its attribution line unwrapped into one paragraph, paragraphs joined with blank lines into documents of
about CLEAN_WORDS words, the way web text extracted from HTML looks. Planted among them, each
after its original where it copies one:

  exact_duplicate   a clean document again (half of them with other spacing and letter case,
                    equal after normalisation)
  near_duplicate    a clean document with NEAR_DUPLICATE_EDITS words replaced
  spam              a few lines repeated many times (optionally around one clean sentence)
  short             a handful of words (navigation text, error pages)

  docs = planted_corpus(num_clean=200, num_each=40, seed=0)   # [PlantedDocument(text, kind, copy_of)]
  ru = clean_documents(100, random.Random(0), "ru")           # Russian prose (fortunes-ru), no planted kinds
  write_jsonl(docs, "planted.jsonl")                         # {"text": ..., "kind": ...} per line
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re

FORTUNE_DIR = "/usr/share/games/fortunes"
# Files of quotations and anecdotes in prose (not one-liners, verse, definitions, code or ASCII art).
PROSE_FILES = ("art", "education", "food", "humorists", "kids", "law", "literature", "love", "magic", "medicine",
               "men-women", "news", "people", "pets", "politics", "science", "sports", "tao", "wisdom", "work")
# Russian prose, for the per-language rules: the Debian package `fortunes-ru` (UTF-8), the files of quotations
# and anecdotes on the same kinds of subjects, made into documents the same way.
RU_FORTUNE_DIR = "/usr/share/games/fortunes/ru"
RU_PROSE_FILES = ("art", "book", "citates", "education", "freewill", "friendship", "future", "genious", "happy",
                  "knowledge", "life", "love", "polit", "success", "sympathy", "time", "truth", "war", "wealth",
                  "work")
CLEAN_WORDS = 400
MIN_FORTUNE_WORDS = 12      # shorter fortunes are one-liners, not paragraphs
# Narrative prose only: fortunes with digits, markup or formula characters, or quoted dialogue are left out.
# (Dialogue matters: datatrove's Gopher quality rule counts every punctuation mark as a word, and
# 3-7% of 300-600 word documents of dialogue-heavy fortunes fall under its 80% alphabetic-word bound.)
NOT_NARRATIVE = re.compile(r'[0-9=*|<>\[\]{}#@_^~\\/"]')
NEAR_DUPLICATE_EDITS = 3
ATTRIBUTION = re.compile(r"\n\s+--\s")   # the indented "-- Author, Source" line that ends most fortunes
KINDS = ("clean", "exact_duplicate", "near_duplicate", "spam", "short")

SPAM_LINES = (
    "Buy cheap replica watches now, best prices guaranteed!",
    "CLICK HERE to claim your free prize today",
    "Subscribe to our newsletter for exclusive deals",
    "Hot singles in your area are waiting for you",
    "Lowest mortgage rates - apply online in minutes",
    "Download the full movie free, no registration",
)
SHORT_TEXTS = (
    "Home | About | Contact", "Page not found.", "Click here to continue.", "Loading...",
    "Share this article", "Sign in or register", "404 error", "Read more", "Copyright 2019. All rights reserved.",
    "Next page", "Posted by admin", "Tags: news, sports",
)
REPLACEMENT_WORDS = ("purple", "seventeen", "harbor", "quietly", "lantern", "cobalt", "meadow", "brisk",
                     "orchard", "velvet", "granite", "thistle")


@dataclasses.dataclass(frozen=True)
class PlantedDocument:
  text: str
  kind: str          # one of KINDS
  copy_of: int = -1  # index (in the corpus) of the clean document a duplicate copies


PROSE = {"en": (FORTUNE_DIR, PROSE_FILES, "fortunes"), "ru": (RU_FORTUNE_DIR, RU_PROSE_FILES, "fortunes-ru")}


def fortunes_available(language: str = "en") -> bool:
  directory, files, _ = PROSE[language]
  return all(os.path.exists(os.path.join(directory, name)) for name in files)


def prose_paragraphs(language: str = "en") -> list[str]:
  """The narrative fortunes of PROSE_FILES (RU_PROSE_FILES for "ru") with at least MIN_FORTUNE_WORDS words,
  each unwrapped into one line."""
  directory, files, package = PROSE[language]
  if not fortunes_available(language):
    raise FileNotFoundError(f"{directory}: the {language} prose needs the Debian package `{package}` "
                            f"(apt-get install {package})")
  paragraphs = []
  for name in files:
    with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
      for record in f.read().split("\n%\n"):
        words = ATTRIBUTION.split(record)[0].replace("%", " ").split()
        paragraph = " ".join(words)
        if len(words) >= MIN_FORTUNE_WORDS and not NOT_NARRATIVE.search(paragraph):
          paragraphs.append(paragraph)
  return paragraphs


def clean_documents(count: int, rng: random.Random, language: str = "en") -> list[str]:
  """`count` documents of about CLEAN_WORDS words from shuffled paragraphs, no paragraph used twice."""
  paragraphs = prose_paragraphs(language)
  rng.shuffle(paragraphs)
  docs, current, words = [], [], 0
  for paragraph in paragraphs:
    current.append(paragraph)
    words += len(paragraph.split())
    if words >= CLEAN_WORDS:
      docs.append("\n\n".join(current))
      current, words = [], 0
      if len(docs) == count:
        return docs
  raise ValueError(f"the {language} fortunes make only {len(docs)} clean documents, {count} asked")


def near_duplicate(text: str, rng: random.Random) -> str:
  """The text with NEAR_DUPLICATE_EDITS words (at distinct positions) replaced; paragraphs kept."""
  paragraphs = [p.split(" ") for p in text.split("\n\n")]
  positions = [(i, j) for i, p in enumerate(paragraphs) for j in range(len(p))]
  for i, j in rng.sample(positions, NEAR_DUPLICATE_EDITS):
    paragraphs[i][j] = rng.choice([w for w in REPLACEMENT_WORDS if w != paragraphs[i][j]])
  return "\n\n".join(" ".join(p) for p in paragraphs)


def spam_document(rng: random.Random, clean_sentence: str) -> str:
  lines = rng.sample(SPAM_LINES, rng.randint(1, 3))
  body = [rng.choice(lines) for _ in range(rng.randint(12, 40))]
  if rng.random() < 0.5:
    body.insert(rng.randrange(len(body)), clean_sentence)
  return "\n".join(body)


def planted_corpus(num_clean: int = 200, num_each: int = 40, seed: int = 0) -> list[PlantedDocument]:
  """Clean documents and `num_each` of every bad kind, shuffled, each copy after the clean document it copies."""
  rng = random.Random(seed)
  clean = clean_documents(num_clean, rng)
  order: list[tuple[str, int]] = [("clean", i) for i in range(num_clean)]
  order += [(kind, i) for kind in ("spam", "short") for i in range(num_each)]
  rng.shuffle(order)
  entries: list[tuple[str, str, int]] = []      # (text, kind, clean index it is or copies; -1: none)
  for kind, i in order:
    if kind == "clean":
      entries.append((clean[i], "clean", i))
    elif kind == "spam":
      entries.append((spam_document(rng, clean[rng.randrange(num_clean)].split("\n\n")[0]), "spam", -1))
    else:
      entries.append((rng.choice(SHORT_TEXTS), "short", -1))
  originals = rng.sample(range(num_clean), 2 * num_each)   # each copied once, by one kind
  for n, source in enumerate(originals):
    kind = "exact_duplicate" if n < num_each else "near_duplicate"
    text = clean[source]
    if kind == "near_duplicate":
      text = near_duplicate(text, rng)
    elif n % 2:   # the same words with other spacing and case: equal after normalisation
      text = " " + text.replace(". ", ".  ").replace("\n\n", " \n\n")
      text = text[:1] + text[1].lower() + text[2:]
    after = next(k for k, e in enumerate(entries) if e[1] == "clean" and e[2] == source)
    entries.insert(rng.randrange(after + 1, len(entries) + 1), (text, kind, source))
  where = {e[2]: k for k, e in enumerate(entries) if e[1] == "clean"}
  return [PlantedDocument(text, kind, where[source] if kind != "clean" and source >= 0 else -1)
          for text, kind, source in entries]


def write_jsonl(docs: list[PlantedDocument], path: str) -> None:
  """One {"text", "kind", "copy_of"} object per line (line n + 1 holds docs[n])."""
  with open(path, "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps({"text": doc.text, "kind": doc.kind, "copy_of": doc.copy_of}) + "\n")
