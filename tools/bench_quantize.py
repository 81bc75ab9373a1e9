"""Bits/byte and decode speed of a checkpoint under each inference weight storage, and with bf16 cache unit states.

  python tools/bench_quantize.py --workdir=runs/tiny [--checkpoint=best] [--output=runs/tiny/eval/weights.json]
  python tools/bench_quantize.py --ceiling_config=configs/neon_qtg_7b.py [--context=2048] [--bandwidth=4.8e12]

Weights: float32 (training's), bfloat16, int8 (every matmul kernel, Qwix), int8 with the head in
bf16; each scored on the prepared validation split with eval's windows (full forward pass), and
timed decoding batch-1 greedy. Cache: the unit states phi in float32 and bf16, scored through the
cached forward pass with model.dtype=bfloat16 (the compute dtype whose cache stores phi in bf16).

--ceiling_config: no checkpoint, only shapes: the bytes one batch-1 decode step reads (every
parameter but the embedding tables, one row of each of those, the whole cache) and the
tokens/s that the memory bandwidth allows at most, for bf16 and int8 weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from neon_qtg_jax.config import default_config  # noqa: E402
from neon_qtg_jax.data.tokenizer import Tokenizer  # noqa: E402
from neon_qtg_jax.evaluation.perplexity import model_log_prob_fn, validation_stream  # noqa: E402
from neon_qtg_jax.evaluation import weight_study  # noqa: E402
from neon_qtg_jax.inference.restore import load_model  # noqa: E402
from neon_qtg_jax.parallel import ShardingConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="")
  p.add_argument("--ceiling_config", default="", help="a config file: print the decode bandwidth ceiling and exit")
  p.add_argument("--context", type=int, default=2048, help="cache slots for the ceiling")
  p.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s for the ceiling (H200: 4.8e12)")
  p.add_argument("--checkpoint", default="best")
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=96)
  p.add_argument("--output", default="", help="JSON result (default: WORKDIR/eval/weights_stepN.json)")
  return p.parse_args(argv)


def ceiling(args) -> int:
  import importlib.util
  spec = importlib.util.spec_from_file_location("ceiling_config", args.ceiling_config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  model_cfg = module.get_config().model
  print(f"batch-1 decode at {args.context} cache slots, {args.bandwidth / 1e12:.1f} TB/s ({args.ceiling_config}):")
  print("| weights | weights read GB | cache read GB | total GB/token | ceiling tokens/s |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for weights in ("bfloat16", "int8"):
    b = weight_study.decode_bytes_per_token(model_cfg, weights, args.context)
    print(f"| {weights} | {b['weights'] / 1e9:.3f} | {b['cache'] / 1e9:.3f} | {b['total'] / 1e9:.3f} | "
          f"{args.bandwidth / b['total']:.0f} |")
  return 0


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.ceiling_config:
    return ceiling(args)
  if not args.workdir:
    print("error: --workdir (a run with a checkpoint) or --ceiling_config is required", file=sys.stderr)
    return 2
  sharding = ShardingConfig.all_fsdp()
  base = load_model(args.workdir, args.checkpoint, sharding=sharding)
  run_config = base.run_config
  tokenizer = Tokenizer.load(run_config.data.data_dir)
  tokens, text_bytes, _ = validation_stream(run_config.data.data_dir, tokenizer.eos_id)
  window = dict(max_length=min(run_config.eval.max_length, base.model.cfg.max_seq_len), stride=run_config.eval.stride,
                batch_size=run_config.training.batch_size)
  sampling = ml_collections.ConfigDict(dict(temperature=0.0, top_k=0, top_p=1.0))
  print(f"checkpoint step {base.step}: {len(tokens) - 1} validation tokens, {text_bytes} bytes")

  def restore(dtype: str = "float32"):
    current = default_config()
    current.model.dtype = dtype
    return load_model(args.workdir, args.checkpoint, current, sharding=sharding).model

  rows = []
  for name, model in weight_study.weight_variants(restore).items():
    result = weight_study.score(model_log_prob_fn(model), tokens, text_bytes, **window)
    result["decode_tokens_per_second"] = weight_study.decode_tokens_per_second(
        model, sampling, prompt_len=args.prompt_len, new_tokens=args.new_tokens, sharding=sharding)
    result["parameter_bytes"] = weight_study.quantize.parameter_bytes(model)
    rows.append({"variant": f"weights {name}"} | result)
    print(f"weights {name:16s} bits/byte {result['bits_per_byte']:.5f}  perplexity {result['perplexity']:.4f}  "
          f"parameters {result['parameter_bytes'] / 2**20:.2f} MiB  decode {result['decode_tokens_per_second']:.1f} "
          "tokens/s", flush=True)
  bf16_compute = restore("bfloat16")
  for phi in ("float32", "bfloat16"):
    result = weight_study.score(weight_study.cached_log_prob_fn(bf16_compute, jnp.dtype(phi)), tokens, text_bytes,
                                **window)
    rows.append({"variant": f"cached, bf16 compute, phi {phi}"} | result)
    print(f"cached, bf16 compute, phi {phi:9s} bits/byte {result['bits_per_byte']:.5f}  "
          f"perplexity {result['perplexity']:.4f}", flush=True)

  reference = rows[0]
  print("\n| variant | bits/byte | perplexity | vs float32 | parameters MiB | decode tokens/s (CPU, batch 1) |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for row in rows:
    cost = math.exp(row["loss"] - reference["loss"]) - 1
    size = f"{row['parameter_bytes'] / 2**20:.2f}" if "parameter_bytes" in row else ""
    speed = f"{row['decode_tokens_per_second']:.1f}" if "decode_tokens_per_second" in row else ""
    print(f"| {row['variant']} | {row['bits_per_byte']:.5f} | {row['perplexity']:.4f} | {cost * 100:+.3f}% | {size} | "
          f"{speed} |")
  output = args.output or os.path.join(args.workdir, "eval", f"weights_step{base.step}.json")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  Path(output).write_text(json.dumps({"checkpoint_step": base.step, "rows": rows}, indent=1))
  print(f"wrote {output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
