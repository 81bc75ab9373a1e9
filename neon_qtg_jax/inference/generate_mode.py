"""--mode=generate: continue prompts with a checkpoint, print the text, tokens/s and peak memory.

The mode only; the generation itself is inference/sampling.py's `continue_prompts`.

  launch.py --mode=generate --workdir=runs/x [--checkpoint=best] --prompt="def " [--output=samples.jsonl]
  launch.py --mode=generate --workdir=runs/x --prompts_file=prompts.txt   # one prompt per line

Without --prompt or --prompts_file the config's sampling.prompts are used. Each prompt is
encoded after an EOS, the separator the training stream puts before every document.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from typing import Iterator

import jax

from neon_qtg_jax.inference.sampling import encode_prompts, continue_prompts_with_stats


def read_prompts(args, sampling_cfg) -> list[str]:
  """--prompt, else the non-empty lines of --prompts_file (\\n escapes allowed), else sampling.prompts."""
  if args.prompt:
    return [args.prompt]
  if args.prompts_file:
    if not os.path.exists(args.prompts_file):
      raise FileNotFoundError(f"--prompts_file={args.prompts_file}: no such file")
    with open(args.prompts_file, encoding="utf-8") as f:
      prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not prompts:
      raise ValueError(f"--prompts_file={args.prompts_file}: no non-empty lines")
    return prompts
  return list(sampling_cfg.prompts)


def peak_memory() -> dict[str, int | None]:
  """Peak bytes on the first device where the backend reports it, and the host process's peak RSS."""
  device_peak = None
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    device_peak = int(stats["peak_bytes_in_use"])
  host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
  return {"device_peak_bytes": device_peak, "host_peak_rss_bytes": int(host_peak)}


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def compile_log() -> Iterator[list[tuple[float, float]]]:
  """(perf_counter when it ended, seconds) of every tracing, lowering and XLA compilation inside the block."""
  events: list[tuple[float, float]] = []

  def listen(name: str, seconds: float, **_) -> None:
    if name in COMPILE_EVENTS:
      events.append((time.perf_counter(), seconds))
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def wall_seconds(events: list[tuple[float, float]], start: float, end: float) -> float:
  """Wall time within [start, end] covered by the events' intervals (nested traces counted once)."""
  spans = sorted((max(t - s, start), min(t, end)) for t, s in events if t - s < end and t > start)
  total, reached = 0.0, start
  for lo, hi in spans:
    if hi > reached:
      total += hi - max(lo, reached)
      reached = hi
  return total


def run(config, args) -> int:
  from neon_qtg_jax.inference.quantize import load_for_inference
  from neon_qtg_jax.inference.restore import load_tokenizer

  from neon_qtg_jax.parallel import ShardingConfig

  # inference.weight_dtype; float32 weights go bf16 only where they won't fit
  restored = load_for_inference(args.workdir, args.checkpoint, config, param_dtype="auto",
                                sharding=ShardingConfig.from_config(config.parallel))
  tokenizer = load_tokenizer(args.workdir, args.checkpoint, restored.run_config, config)  # carried by the checkpoint
  sampling = config.sampling
  max_new = min(sampling.max_new_tokens, restored.model.cfg.max_seq_len - 1)
  texts = read_prompts(args, sampling)
  prompt_ids, cut = encode_prompts(tokenizer, texts, restored.model.cfg.max_seq_len - max_new)
  for i, n in enumerate(cut):
    if n:
      print(f"note: prompt {i} kept its last {len(prompt_ids[i])} tokens ({n} cut) to leave room for "
            f"{max_new} new ones within model.max_seq_len={restored.model.cfg.max_seq_len}")

  began = time.perf_counter()
  with compile_log() as compiles:
    outputs, stats = continue_prompts_with_stats(restored.model, prompt_ids, sampling_cfg=sampling,
                                                 max_new_tokens=max_new, eos_id=tokenizer.eos_id, seed=sampling.seed,
                                                 valid_vocab=tokenizer.vocab_size, sharding=restored.sharding)
  prefilled = began + stats.prefill_seconds
  prefill_compile = wall_seconds(compiles, began, prefilled)
  decode_compile = wall_seconds(compiles, prefilled, prefilled + stats.decode_seconds)
  decode_seconds = max(stats.decode_seconds - decode_compile, 1e-9)
  records = []
  for text, new_ids in zip(texts, outputs):
    completion = tokenizer.decode(new_ids)
    records.append({"prompt": text, "completion": completion, "new_tokens": len(new_ids)})
    print(f"--- prompt: {text!r}\n{text}{completion}\n")
  memory = peak_memory()
  device_mib = f"{memory['device_peak_bytes'] / 2**20:.1f} MiB" if memory["device_peak_bytes"] else "not reported"
  print(f"checkpoint step {restored.step}, weights {restored.weight_dtype} "
        f"({restored.parameter_bytes / 2**20:.1f} MiB); {len(texts)} prompt(s), {stats.prompt_tokens} prompt tokens, "
        f"{stats.new_tokens} new tokens")
  print(f"prefill {max(stats.prefill_seconds - prefill_compile, 0.0):.2f} s, decode {decode_seconds:.2f} s "
        f"({stats.new_tokens / decode_seconds:.1f} tokens/s), compilation apart: "
        f"{prefill_compile + decode_compile:.1f} s")
  print(f"peak memory: device {device_mib}, host RSS {memory['host_peak_rss_bytes'] / 2**20:.1f} MiB")
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      for record in records:
        f.write(json.dumps(record) + "\n")
    print(f"wrote {args.output}")
  return 0
