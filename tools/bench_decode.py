"""Decode benchmark: tokens/s of cached decoding against full recomputation, in the same process.

Cached: `inference.sampling.continue_prompts` (one compiled prefill, one compiled decode loop over the
fixed-size cache). Recompute: `inference.recompute.generate_recompute`, a compiled loop that
runs the full forward pass over the whole prompt + generation buffer at every step, as a jit
loop without a cache must (fixed shapes). Both decode greedily from the same random prompts
with the same freshly initialised model, each timed after a warm-up that compiles it, and the
tokens they produce are compared. Prints one line per (prompt, generation) length pair.

  python tools/bench_decode.py                              # tiny config, 128/256 and 512/512
  python tools/bench_decode.py --lengths=64/64 --batch_size=1 --output=bench_decode.json
  python tools/bench_decode.py --config=configs/neon_qtg_7b.py --lengths=512/512   # on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import neon_qtg_jax  # noqa: F401  first: without a GPU driver it keeps jax on the CPU
import jax
import numpy as np
from flax import nnx

from neon_qtg_jax.config import default_config
from neon_qtg_jax.inference.recompute import generate_recompute
from neon_qtg_jax.inference.sampling import SamplingParams, continue_prompts_with_stats
from neon_qtg_jax.model import QTGModel
from neon_qtg_jax.parallel import ShardingConfig

GREEDY = SamplingParams(temperature=0.0)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="", help="config file (default: the tiny default_config())")
  p.add_argument("--lengths", default="128/256,512/512", help="comma-separated prompt/generation lengths")
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", default="", help="also write the results as JSON here")
  return p.parse_args(argv)


def load_config(path: str):
  if not path:
    return default_config()
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def time_cached(model: QTGModel, prompts: list[list[int]], new: int,
                sharding: ShardingConfig) -> tuple[float, list[list[int]]]:
  continue_prompts_with_stats(model, prompts, sampling_cfg=GREEDY, max_new_tokens=new, eos_id=None, seed=0,
                              sharding=sharding)  # compile
  began = time.perf_counter()
  out, _ = continue_prompts_with_stats(model, prompts, sampling_cfg=GREEDY, max_new_tokens=new, eos_id=None, seed=0,
                                       sharding=sharding)
  return time.perf_counter() - began, out


def time_recompute(model: QTGModel, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
  generate_recompute(model, prompts, params=GREEDY, max_new_tokens=new, seed=0, steps=1)  # compile, one step
  began = time.perf_counter()
  out = generate_recompute(model, prompts, params=GREEDY, max_new_tokens=new, seed=0)
  return time.perf_counter() - began, out


def main(argv=None) -> int:
  args = parse_args(argv)
  pairs = [tuple(int(x) for x in item.split("/")) for item in args.lengths.split(",")]
  config = load_config(args.config)
  m = config.model
  m.max_seq_len = max(m.max_seq_len, max(p + g for p, g in pairs))
  m.attention_impl = "reference"  # the same attention math in both paths; the cache path has no kernels
  model = QTGModel(m, rngs=nnx.Rngs(args.seed))
  rng = np.random.default_rng(args.seed)
  print(f"device {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
        f"d={m.embed_dim} layers={m.num_layers} heads={m.num_heads} vocab={m.vocab_size} "
        f"attention={m.attention} topofilter={m.topofilter} dtype={m.dtype}, batch {args.batch_size}, greedy")
  results = []
  for prompt_len, new in pairs:
    prompts = rng.integers(0, m.vocab_size, (args.batch_size, prompt_len)).tolist()
    cached_s, cached = time_cached(model, prompts, new, ShardingConfig.from_config(config.parallel))
    full_s, full = time_recompute(model, prompts, new)
    tokens = args.batch_size * new
    agree = float(np.mean(np.asarray(cached) == np.asarray(full)))
    row = {"prompt": prompt_len, "new": new, "batch": args.batch_size,
           "cached_tokens_per_s": tokens / cached_s, "recompute_tokens_per_s": tokens / full_s,
           "speedup": full_s / cached_s, "cached_s": cached_s, "recompute_s": full_s, "token_agreement": agree}
    results.append(row)
    print(f"prompt {prompt_len:5d} new {new:5d}: cached {row['cached_tokens_per_s']:9.1f} tok/s, "
          f"recompute {row['recompute_tokens_per_s']:8.1f} tok/s, speedup x{row['speedup']:.1f} "
          f"(same greedy tokens: {agree:.1%})")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "model": m.to_dict(), "results": results}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
