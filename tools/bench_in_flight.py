"""What bounding the host to one step in flight costs (training/loop.py, Loop.in_flight): the tiny config trained
with the bound and without it, alternately, in one process; steps/s from metrics.jsonl.

  python tools/bench_in_flight.py [--steps 250] [--repeats 2] [--data_dir data/stdlib]

Each run logs every 50 steps; its rate is the mean of the perf/steps_per_s of its log steps after the
first (which holds the compilation). Evaluation, samples and saves are pushed past the end of the run
except the final ones, which are not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neon_qtg_jax.cli import RunArgs  # noqa: E402
from neon_qtg_jax.config import validate  # noqa: E402
from neon_qtg_jax.training import trainer  # noqa: E402
from neon_qtg_jax.training.loop import Loop  # noqa: E402
from neon_qtg_jax.training.metric_writers import read_jsonl  # noqa: E402


def tiny_config(steps: int, data_dir: str):
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "neon_qtg_tiny.py")
  spec = importlib.util.spec_from_file_location("tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  t = config.training
  t.total_steps, t.log_steps, t.max_train_minutes = steps, 50, 0.0
  t.eval_steps = t.save_steps = t.sample_steps = 10 * steps
  config.data.data_dir = data_dir
  return validate(config)


def rate(workdir: str) -> float:
  records = [r for r in read_jsonl(os.path.join(workdir, "outputs", "logs", "metrics.jsonl")) if "perf/steps_per_s" in r]
  return statistics.mean(r["perf/steps_per_s"] for r in records[1:])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=250)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--data_dir", default="data/stdlib")
  args = parser.parse_args()
  config = tiny_config(args.steps, args.data_dir)
  rates: dict[str, list[float]] = {"one step in flight": [], "unbounded": []}
  for _ in range(args.repeats):
    for name, in_flight in (("one step in flight", 1), ("unbounded", None)):
      Loop.in_flight = in_flight
      with tempfile.TemporaryDirectory() as workdir:
        assert trainer.run(config, RunArgs(workdir=workdir)) == 0
        rates[name].append(rate(workdir))
  import jax
  print(f"tiny config, {args.steps} steps, log_steps 50, {jax.devices()[0].device_kind}, {args.repeats} runs each "
        "(alternating)")
  for name, values in rates.items():
    print(f"  {name:18s} {statistics.mean(values):7.2f} steps/s  (runs: {', '.join(f'{v:.2f}' for v in values)})")
  bounded, unbounded = (statistics.mean(v) for v in rates.values())
  print(f"  cost of the bound: {1 - bounded / unbounded:+.1%} of the unbounded rate")


if __name__ == "__main__":
  main()
