"""Serving throughput and latency at 1, 4, 8 and 16 concurrent clients against one --mode=serve engine.

  python tools/bench_serve.py --workdir=runs/tiny [--clients=1,4,8,16] [--requests=4] [--max_tokens=100]

Starts the server in this process (the same build as launch.py --mode=serve, on a free local
port), then for each concurrency level runs that many clients at once, each sending `--requests`
streaming completions one after another through the official openai client, with fixed output
lengths (ignore_eos). Reports total completion tokens/s (all clients together, over the level's
wall time), time to first token and time per output token after the first (means and p90 over
requests), and the ratio of each level's tokens/s to the single client's. Prints a Markdown table
and writes JSON, with the machine's load average (other jobs on a shared machine slow every level).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai  # noqa: E402

from neon_qtg_jax.config import apply_assignments, default_config, validate  # noqa: E402
from neon_qtg_jax.serving.api import create_app  # noqa: E402
from neon_qtg_jax.serving.server import build, free_port, make_server  # noqa: E402

PROMPTS = ("def ", "import ", "The ", "class ", "for i in ", "return ", "# ", "if __name__")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--checkpoint", default="best")
  p.add_argument("--clients", default="1,4,8,16")
  p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
  p.add_argument("--max_tokens", type=int, default=100)
  p.add_argument("--set", action="append", default=[], help="SECTION.FIELD=VALUE config change (repeatable)")
  p.add_argument("--output", default="", help="JSON result (default: WORKDIR/eval/bench_serve.json)")
  return p.parse_args(argv)


def one_client(base: str, model: str, index: int, requests: int, max_tokens: int, records: list) -> None:
  client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
  for r in range(requests):
    began = time.perf_counter()
    stamps = []
    for chunk in client.completions.create(model=model, prompt=PROMPTS[(index + r) % len(PROMPTS)],
                                           max_tokens=max_tokens, temperature=0.8, seed=index * 1000 + r,
                                           stream=True, extra_body={"ignore_eos": True}):
      if chunk.choices and chunk.choices[0].text:
        stamps.append(time.perf_counter())
    records.append({"ttft": stamps[0] - began, "tpot": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1),
                    "chunks": len(stamps)})


def level(base: str, model: str, clients: int, requests: int, max_tokens: int, engine) -> dict:
  records: list[dict] = []
  generated = engine.stats.generated_tokens
  threads = [threading.Thread(target=one_client, args=(base, model, i, requests, max_tokens, records))
             for i in range(clients)]
  began = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - began
  tokens = engine.stats.generated_tokens - generated
  if len(records) != clients * requests:
    raise RuntimeError(f"{clients * requests - len(records)} requests failed")

  def p90(xs):
    return sorted(xs)[int(0.9 * (len(xs) - 1))]
  ttft = [r["ttft"] for r in records]
  tpot = [r["tpot"] for r in records]
  return {"clients": clients, "requests": len(records), "tokens": tokens, "seconds": wall,
          "tokens_per_second": tokens / wall, "ttft_mean_s": statistics.mean(ttft), "ttft_p90_s": p90(ttft),
          "tpot_mean_s": statistics.mean(tpot), "tpot_p90_s": p90(tpot)}


def main(argv=None) -> int:
  args = parse_args(argv)
  config = validate(apply_assignments(default_config(), args.set))
  server, engine = build(config, args.workdir, args.checkpoint)
  port = free_port()
  http = make_server(create_app(server), engine, "127.0.0.1", port, drain_seconds=5)
  thread = threading.Thread(target=http.run, daemon=True)
  thread.start()
  while not http.started:
    time.sleep(0.05)
  base = f"http://127.0.0.1:{port}"
  levels = [int(c) for c in args.clients.split(",")]
  level(base, server.model_name, 1, 1, 8, engine)  # compiles the prefill buckets of the prompts
  rows = []
  load_before = os.getloadavg()[0]
  for clients in levels:
    row = level(base, server.model_name, clients, args.requests, args.max_tokens, engine)
    rows.append(row)
    print(f"{clients} client(s): {row['tokens']} tokens in {row['seconds']:.1f} s = {row['tokens_per_second']:.1f} "
          f"tokens/s, first token {row['ttft_mean_s'] * 1000:.0f} ms, {row['tpot_mean_s'] * 1000:.1f} ms/token",
          flush=True)
  http.should_exit = True
  thread.join(10)
  engine.stop()

  single = rows[0]["tokens_per_second"]
  load = (load_before, os.getloadavg()[0])
  print(f"\n{server.model_name} (checkpoint step {server.info['checkpoint_step']}), {config.serve.slots} slots, "
        f"weights {server.info['weight_dtype']}, {args.requests} streaming requests of {args.max_tokens} tokens per "
        f"client, {os.cpu_count()} CPUs, load average {load[0]:.1f} before and {load[1]:.1f} after")
  print("| clients | tokens/s (all clients) | vs 1 client | time to first token mean / p90 (ms) | "
        "time per output token mean / p90 (ms) |")
  print("| ---: | ---: | ---: | ---: | ---: |")
  for row in rows:
    print(f"| {row['clients']} | {row['tokens_per_second']:.1f} | {row['tokens_per_second'] / single:.2f}x | "
          f"{row['ttft_mean_s'] * 1000:.0f} / {row['ttft_p90_s'] * 1000:.0f} | "
          f"{row['tpot_mean_s'] * 1000:.1f} / {row['tpot_p90_s'] * 1000:.1f} |")
  output = args.output or os.path.join(args.workdir, "eval", "bench_serve.json")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  Path(output).write_text(json.dumps({"slots": config.serve.slots, "weight_dtype": server.info["weight_dtype"],
                                      "checkpoint_step": server.info["checkpoint_step"], "max_tokens": args.max_tokens,
                                      "load_average": load, "cpus": os.cpu_count(), "levels": rows}, indent=1))
  print(f"wrote {output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
