"""The lm-evaluation-harness model "neon_qtg": offline, on the YAML tasks over tests/harness_tasks/neon_local.jsonl."""

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (extra `harness`) is not installed")

from neon_qtg_jax.cli import RunArgs  # noqa: E402
from neon_qtg_jax.evaluation import perplexity  # noqa: E402
from neon_qtg_jax.evaluation.harness import NeonQTGLM  # noqa: E402

from tiny_checkpoint import make_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "harness_tasks")
LONG_TEXT = "\n".join(f"def f{i}(x):\n\treturn x * {i} + {i % 7}" for i in range(8))  # several windows of 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("harness")
  config, model = make_run(root)
  return root, config, NeonQTGLM(checkpoint=str(root / "work"), batch_size=4)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  """No hub: datasets reads the local JSON lines; its cache goes to a temporary directory."""
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.chdir(ROOT)  # the task files name the data relative to the repository root


def request(*args):
  return types.SimpleNamespace(args=args)


def test_loglikelihood_is_the_sum_over_the_continuation_of_the_full_forward_pass(run):
  _, _, lm = run
  pairs = [("The value 4 is", " even."), ("def f3(x):\n\treturn x * 3 +", " 3"), ("", "The value"),
           ("The value 9 ", "is odd.")]
  got = lm.loglikelihood([request(c, x) for c, x in pairs], disable_tqdm=True)
  encoded = [lm.encode_pair(c, x) for c, x in pairs]
  padded = np.zeros((len(pairs), lm.window), np.int32)  # causal: padding after a sequence leaves it unchanged
  for row, (ids, _) in enumerate(encoded):
    padded[row, :len(ids) - 1] = ids[:-1]
  all_logits = lm.model(jnp.asarray(padded))
  for (ids, n), logits, (score, greedy) in zip(encoded, all_logits, got):
    logits = logits[:len(ids) - 1]
    logp = jax.nn.log_softmax(logits, axis=-1)[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]
    assert score == pytest.approx(float(jnp.sum(logp[-n:])), rel=1e-5, abs=1e-4)
    assert greedy == bool(jnp.all(jnp.argmax(logits, -1)[-n:] == jnp.asarray(ids[-n:])))
  # the continuation's tokens are those of context + continuation after the context's (trailing space moved)
  ids, n = lm.encode_pair("The value 9 ", "is odd.")
  assert ids[-n:] == lm.tokenizer.encode("The value 9 is odd.")[-n:]


def test_loglikelihood_rolling_equals_eval_mode_perplexity_of_the_same_text(run, tmp_path):
  """--mode=eval scores EOS text EOS; the harness scores EOS text: they differ by the final EOS's log p alone."""
  root, config, lm = run
  # A text whose last eval window ends at its last token: then the extra EOS of --mode=eval is scored by a window
  # of its own and every text token gets the same context in both (evaluation/perplexity.py window_plan).
  text = next(LONG_TEXT[:end] for end in range(len(LONG_TEXT), 0, -1) if not LONG_TEXT[end - 1].isspace()
              and (len(lm.tokenizer.encode(LONG_TEXT[:end])) - lm.eval_window) % lm.eval_stride == 0)
  (rolling,) = lm.loglikelihood_rolling([request(text)], disable_tqdm=True)
  data = tmp_path / "text.jsonl"
  data.write_text(json.dumps({"text": text}) + "\n")
  out = tmp_path / "ppl.json"
  assert perplexity.run(config, RunArgs(workdir=str(root / "work"), eval_data=str(data), output=str(out))) == 0
  result = json.loads(out.read_text())
  stream = [lm.tokenizer.eos_id] + lm.tokenizer.encode(text) + [lm.tokenizer.eos_id]
  assert result["tokens"] == len(stream) - 1 and len(stream) > 2 * lm.eval_window  # several windows
  last = stream[-(lm.eval_window + 1):]
  final_eos = jax.nn.log_softmax(lm.model(jnp.asarray([last[:-1]]))[0, -1])[lm.tokenizer.eos_id]
  eval_nll = result["loss"] * result["tokens"]
  assert -rolling == pytest.approx(eval_nll + float(final_eos), rel=1e-5)


def test_generate_until_cuts_at_the_stop_string(run):
  _, _, lm = run
  out = lm.generate_until([request("def f3(x):", {"until": ["\n"], "max_gen_toks": 12}),
                           request("The value", {"until": ["is"], "max_gen_toks": 6, "do_sample": False})],
                          disable_tqdm=True)
  assert "\n" not in out[0] and "is" not in out[1]


def test_simple_evaluate_runs_the_local_yaml_tasks_offline(run):
  root, _, lm = run
  from lm_eval.tasks import TaskManager
  results = lm_eval.simple_evaluate(model=lm, tasks=["neon_local_mc", "neon_local_ppl", "neon_local_gen"],
                                    task_manager=TaskManager(include_path=TASKS), random_seed=0, numpy_random_seed=0,
                                    torch_random_seed=0, fewshot_random_seed=0)["results"]
  docs = [json.loads(line) for line in open(os.path.join(TASKS, "neon_local.jsonl"))]
  assert 0.0 <= results["neon_local_mc"]["acc,none"] <= 1.0
  assert 0.0 <= results["neon_local_gen"]["exact_match,none"] <= 1.0
  # bits per byte from the harness = our rolling log-likelihoods over the UTF-8 bytes of the texts
  nll = -sum(lm.loglikelihood_rolling([request(d["text"]) for d in docs], disable_tqdm=True))
  text_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
  assert results["neon_local_ppl"]["bits_per_byte,none"] == pytest.approx(nll / math.log(2) / text_bytes, rel=1e-6)


def test_lm_eval_command_line_with_the_model_registered(run, tmp_path):
  """From another directory, on a copy of the workdir, with the training data directory gone: the checkpoint
  carries the tokenizer."""
  root, _, _ = run
  copied = tmp_path / "copied_run"
  shutil.copytree(root / "work", copied)
  tasks = tmp_path / "tasks"  # the task file with its data named by an absolute path
  tasks.mkdir()
  text = open(os.path.join(TASKS, "neon_local_mc.yaml")).read()
  (tasks / "neon_local_mc.yaml").write_text(text.replace("tests/harness_tasks/", TASKS + "/"))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  os.rename(root / "data", root / "data_away")
  try:
    proc = subprocess.run([sys.executable, "-m", "neon_qtg_jax.evaluation.lm_eval_cli", "--model", "neon_qtg",
                           "--model_args", f"checkpoint={copied},batch_size=4,weight_dtype=int8",
                           "--tasks", "neon_local_mc", "--include_path", str(tasks),
                           "--output_path", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  finally:
    os.rename(root / "data_away", root / "data")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (path,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
  result = json.loads(open(path).read())
  assert "acc,none" in result["results"]["neon_local_mc"]
  assert result["config"]["model"] == "neon_qtg"
