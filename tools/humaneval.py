"""HumanEval pass@k of a checkpoint: n samples per problem, each run in the sandbox.

This executes code written by the model. It runs only with --allow_code_execution, each
program in a separate `python -I -S` with a time limit, a memory limit, no network and a
read-only view of the file system holding only the interpreter and a private directory
(bubblewrap, else kernel namespaces; neon_qtg_jax/evaluation/sandbox.py). Where neither works it
refuses unless --unsafe_no_isolation is given. Still, prefer a machine you can afford to lose.

  python tools/humaneval.py --workdir=runs/x --allow_code_execution                  # greedy pass@1
  python tools/humaneval.py --workdir=runs/x --allow_code_execution --num_samples=20 --temperature=0.8 --k=1,10
  python tools/humaneval.py --workdir=runs/x --allow_code_execution --limit=10      # first 10 problems
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_collections

from neon_qtg_jax.evaluation import humaneval
from neon_qtg_jax.evaluation.sandbox import Limits, choose_isolation
from neon_qtg_jax.evaluation.result_files import claimed, result_path
from neon_qtg_jax.inference.restore import load_model_and_tokenizer
from neon_qtg_jax.inference.sampling import text_completer
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.evaluation.tool_cli import add_checkpoint_args, run_tool, write_json


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_checkpoint_args(p)
  p.add_argument("--allow_code_execution", action="store_true", help="required: runs model-written code")
  p.add_argument("--unsafe_no_isolation", action="store_true",
                 help="run programs on the host's file system where neither bubblewrap nor namespaces work (unsafe)")
  p.add_argument("--num_samples", type=int, default=1, help="completions per problem (n)")
  p.add_argument("--k", default="1", help="comma-separated k for pass@k (each <= num_samples)")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=0.95)
  p.add_argument("--max_new_tokens", type=int, default=384)
  p.add_argument("--batch_size", type=int, default=16, help="problems generated together")
  p.add_argument("--limit", type=int, default=0, help="only the first N problems (0: all 164)")
  p.add_argument("--timeout_s", type=float, default=10.0, help="wall-clock limit per program")
  p.add_argument("--memory_mb", type=int, default=1024, help="address-space limit per program")
  p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="programs run at once")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default="", help="result JSON (default: WORKDIR/eval/humaneval_n..._stepN.json)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if not args.allow_code_execution:
    print("error: HumanEval runs code written by the model; pass --allow_code_execution to run it in the sandbox",
          file=sys.stderr)
    return 2
  ks = [int(k) for k in args.k.split(",")]
  if max(ks) > args.num_samples:
    print(f"error: --k={args.k} needs --num_samples >= {max(ks)}", file=sys.stderr)
    return 2
  limits = Limits(timeout_s=args.timeout_s, memory_bytes=args.memory_mb << 20,
                  allow_unisolated=args.unsafe_no_isolation)
  choose_isolation(limits)  # refuses (exit 2, naming what to install) before the model is loaded
  problems = humaneval.load_problems()
  if args.limit:
    problems = dict(list(problems.items())[:args.limit])
  restored, tokenizer = load_model_and_tokenizer(args.workdir, args.checkpoint, sharding=ShardingConfig.all_fsdp())
  settings = {"n": args.num_samples, "t": args.temperature, "topk": args.top_k, "topp": args.top_p,
              "tok": args.max_new_tokens, "seed": args.seed}
  if args.limit:
    settings["limit"] = args.limit
  output = args.output or result_path(args.workdir, "humaneval", "164", step=restored.step, settings=settings)
  samples_path = os.path.splitext(output)[0] + "_samples.jsonl"
  with claimed([output, samples_path], args.overwrite):
    sampling = ml_collections.ConfigDict({"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p})
    complete = text_completer(restored.model, tokenizer, sampling, args.max_new_tokens, seed=args.seed,
                              sharding=restored.sharding)
    samples = humaneval.generate_samples(complete, problems, args.num_samples, args.batch_size)
    outcomes = humaneval.execute(problems, samples, allow_execution=True, limits=limits, workers=args.workers)
    scores = humaneval.pass_at_k(samples, outcomes, ks)
    humaneval.write_samples(samples_path, samples, outcomes)
    statuses = {}
    for o in outcomes:
      statuses[o.status] = statuses.get(o.status, 0) + 1
    result = {k: v for k, v in scores.items() if k.startswith("pass@")} | {
        "checkpoint_step": restored.step, "problems": len(problems), "num_samples": args.num_samples,
        "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
        "outcomes": statuses, "network_isolation": sorted({o.network for o in outcomes}),
        "filesystem_isolation": sorted({o.filesystem for o in outcomes}),
        "samples_file": samples_path, "per_task": scores["per_task"],
    }
    write_json(output, result)
  print(" ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("pass@")) +
        f" over {len(problems)} problems x {args.num_samples} samples; outcomes {statuses} -> {output}")
  return 0


if __name__ == "__main__":
  run_tool(main)
