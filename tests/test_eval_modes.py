"""--mode=eval and --mode=generate end to end: a saved checkpoint, a trained tokenizer, files on disk."""

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from neon_qtg_jax.cli import RunArgs
from neon_qtg_jax.config import default_config
from neon_qtg_jax.data.manifest import Manifest
from neon_qtg_jax.data.prepare import prepare_dataset
from neon_qtg_jax.data.tokenizer import Tokenizer
from neon_qtg_jax.evaluation import perplexity
from neon_qtg_jax.evaluation.result_files import ResultExistsError, claim
from neon_qtg_jax.inference import generate_mode
from neon_qtg_jax.inference.restore import load_model
from neon_qtg_jax.inference.sampling import SamplingParams, continue_prompts
from neon_qtg_jax.model import QTGModel
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.checkpoint.checkpointer import Checkpointer

TEXT = [f"def f{i}(x):\n\treturn x * {i} + {i % 7}" for i in range(60)] + \
       [f"The value {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  config = default_config()
  (root / "corpus.txt").write_text("\n\n".join(TEXT))
  config.data.update(dict(source="text", paths=str(root / "corpus.txt"), text_split="blank_line",
                          data_dir=str(root / "data"), val_fraction=0.2, max_length=16, stride=8))
  # d=64: the 128 x 128 kernels are large enough to be sharded over several devices
  config.model.update(dict(vocab_size=384, embed_dim=64, num_layers=1, num_heads=4, max_seq_len=32))
  prepare_dataset(config, progress=False, num_processes=1)  # the tokenizer comes out smaller than 384 ids
  tokenizer = Tokenizer.load(config.data.data_dir)
  config.eval.update(dict(max_length=16, stride=8))
  config.training.batch_size = 4
  config.sampling.max_new_tokens = 8
  model = QTGModel(config.model, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  checkpointer = Checkpointer(str(root / "work"), keep=2)
  checkpointer.save(3, params=params, opt_state=optax.adam(1e-3).init(params.to_pure_dict()), meta={"step": 3},
                    config=config, val_loss=1.0)
  checkpointer.manager.wait_until_finished()
  checkpointer.manager.close()
  return root, config, tokenizer, model


def test_restore_reads_the_checkpoint_parameters(run_dir, caplog):
  root, config, _, model = run_dir
  with caplog.at_level(logging.WARNING):
    restored = load_model(str(root / "work"), "best", config, sharding=ShardingConfig.from_config(config.parallel))
  # The restore opens the checkpoints read only on purpose; Orbax's notice of it is not passed on.
  assert not [r for r in caplog.records if "read only" in r.getMessage()]
  assert restored.step == 3
  for a, b in zip(nnx.state(model, nnx.Param).flat_state(), nnx.state(restored.model, nnx.Param).flat_state()):
    assert a[0] == b[0] and (a[1][...] == b[1][...]).all()


def test_bf16_restore_halves_parameter_memory_and_keeps_the_predictions(run_dir):
  root, config, _, model = run_dir
  bf16 = ml_collections.ConfigDict(config.to_dict())
  bf16.model.dtype = "bfloat16"
  restored = load_model(str(root / "work"), "best", bf16, param_dtype="compute",
                        sharding=ShardingConfig.from_config(bf16.parallel)).model
  for (path, a), (_, b) in zip(nnx.state(model, nnx.Param).flat_state(), nnx.state(restored, nnx.Param).flat_state()):
    assert b[...].dtype == jnp.bfloat16, path
    np.testing.assert_array_equal(b[...], a[...].astype(jnp.bfloat16))
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 384)
  reference = jax.nn.log_softmax(model(tokens))
  np.testing.assert_allclose(jax.nn.log_softmax(restored(tokens)), reference, atol=0.05)


def test_eval_mode_scores_a_jsonl_file_and_counts_bad_lines(run_dir, capsys):
  root, config, tokenizer, _ = run_dir
  data = root / "eval.jsonl"
  docs = ["def g(x):\n\treturn x", "The value 3 is odd."]
  data.write_text(json.dumps({"text": docs[0]}) + "\n{not json\n" + json.dumps({"text": docs[1]}) + "\n")
  output = root / "ppl.json"
  args = RunArgs(workdir=str(root / "work"), eval_data=str(data), output=str(output))
  assert perplexity.run(config, args) == 0
  result = json.loads(output.read_text())
  expected_tokens = sum(len(tokenizer.encode(d)) + 1 for d in docs)  # each document and its EOS
  assert result["tokens"] == expected_tokens
  assert result["bytes"] == sum(len(d.encode()) for d in docs)
  assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
  assert result["bad_input"]["counts"] == {"malformed_json": 1}
  assert result["checkpoint_step"] == 3
  assert (root / "ppl.png").stat().st_size > 0  # the per-token loss histogram
  assert "perplexity" in capsys.readouterr().out


def test_eval_mode_scores_the_prepared_validation_split(run_dir):
  root, config, _, _ = run_dir
  manifest = Manifest.load(config.data.data_dir)
  output = root / "ppl_val.json"
  assert perplexity.run(config, RunArgs(workdir=str(root / "work"), output=str(output))) == 0
  result = json.loads(output.read_text())
  assert result["tokens"] == manifest.tokens["val"]  # every token after the leading EOS, once
  assert result["bytes"] == manifest.text_bytes["val"]
  assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / result["bytes"])


def test_eval_mode_with_int8_weights_names_them_in_the_result(run_dir, tmp_path):
  root, config, _, _ = run_dir
  int8 = ml_collections.ConfigDict(config.to_dict())
  int8.inference.weight_dtype = "int8"
  workdir = tmp_path / "work"
  subprocess.run(["cp", "-r", str(root / "work"), str(workdir)], check=True)
  assert perplexity.run(config, RunArgs(workdir=str(workdir), output=str(tmp_path / "f32.json"))) == 0
  assert perplexity.run(int8, RunArgs(workdir=str(workdir))) == 0
  (path,) = (workdir / "eval").glob("perplexity_val_*weightsint8*.json")
  result, reference = json.loads(path.read_text()), json.loads((tmp_path / "f32.json").read_text())
  assert result["weight_dtype"] == "int8" and reference["weight_dtype"] == "float32"
  assert result["bits_per_byte"] == pytest.approx(reference["bits_per_byte"], rel=0.01)


def test_eval_results_are_named_after_the_data_and_never_overwritten(run_dir, tmp_path):
  root, config, _, _ = run_dir
  workdir = tmp_path / "work"
  subprocess.run(["cp", "-r", str(root / "work"), str(workdir)], check=True)
  data = tmp_path / "eval.jsonl"
  data.write_text(json.dumps({"text": "def g(x):\n\treturn x"}) + "\n")
  assert perplexity.run(config, RunArgs(workdir=str(workdir))) == 0
  assert perplexity.run(config, RunArgs(workdir=str(workdir), eval_data=str(data))) == 0
  names = sorted(os.listdir(workdir / "eval"))
  assert names[0].startswith("perplexity_eval-") and names[2] == "perplexity_val_len16_stride8_step3.json"
  assert len(names) == 4  # two JSON results, two histograms
  first = (workdir / "eval" / names[2]).read_text()
  with pytest.raises(ResultExistsError, match="already holds an earlier result; pass --overwrite"):
    perplexity.run(config, RunArgs(workdir=str(workdir)))
  assert (workdir / "eval" / names[2]).read_text() == first
  assert perplexity.run(config, RunArgs(workdir=str(workdir), overwrite=True)) == 0


def test_claims_are_exclusive_when_made_at_the_same_moment(tmp_path):
  path = str(tmp_path / "eval" / "result.json")
  barrier, results = threading.Barrier(8), []

  def race():
    barrier.wait()
    try:
      results.append(claim(path, overwrite=False))
    except ResultExistsError as err:
      results.append(err)

  threads = [threading.Thread(target=race) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sum(r == path for r in results) == 1, results
  assert all("claimed by another evaluation" in str(r) for r in results if r != path)


def test_two_evaluations_at_once_never_overwrite(run_dir, tmp_path, monkeypatch):
  root, config, _, _ = run_dir
  workdir = tmp_path / "work"
  subprocess.run(["cp", "-r", str(root / "work"), str(workdir)], check=True)
  scoring, finished, lock = threading.Event(), [], threading.Lock()
  real_score = perplexity.score_stream

  def score_when_both_got_here(*args, **kwargs):  # holds the first run at the work until the other is past its claim
    with lock:
      finished.append("scoring")
      if finished.count("scoring") == 2:
        scoring.set()
    assert scoring.wait(timeout=60)
    return real_score(*args, **kwargs)

  monkeypatch.setattr(perplexity, "score_stream", score_when_both_got_here)
  results = []

  def evaluate():
    try:
      results.append(perplexity.run(config, RunArgs(workdir=str(workdir))))
    except ResultExistsError as err:
      results.append(err)
    finally:
      scoring.set()

  threads = [threading.Thread(target=evaluate) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(results) == 2 and results.count(0) == 1, results
  refused = next(r for r in results if r != 0)
  assert isinstance(refused, ResultExistsError) and "claimed by another evaluation" in str(refused)
  assert sorted(os.listdir(workdir / "eval")) == ["perplexity_val_len16_stride8_step3.json",
                                                   "perplexity_val_len16_stride8_step3.png"]


def test_the_histogram_is_named_like_its_result_and_never_overwritten(run_dir, tmp_path):
  root, config, _, _ = run_dir
  output = tmp_path / "ppl.json"
  png = tmp_path / "ppl.png"
  png.write_bytes(b"an earlier histogram")
  with pytest.raises(ResultExistsError, match=r"ppl\.png already holds an earlier result"):
    perplexity.run(config, RunArgs(workdir=str(root / "work"), output=str(output)))
  assert png.read_bytes() == b"an earlier histogram" and not output.exists()  # the JSON's claim is released
  png.unlink()
  assert perplexity.run(config, RunArgs(workdir=str(root / "work"), output=str(output))) == 0
  assert png.read_bytes().startswith(b"\x89PNG") and json.loads(output.read_text())["tokens"] > 0


def test_a_failed_evaluation_releases_its_claims(run_dir, tmp_path, monkeypatch):
  root, config, _, _ = run_dir
  output = tmp_path / "ppl.json"

  def fail(*args, **kwargs):
    raise RuntimeError("scoring failed")

  monkeypatch.setattr(perplexity, "score_stream", fail)
  with pytest.raises(RuntimeError, match="scoring failed"):
    perplexity.run(config, RunArgs(workdir=str(root / "work"), output=str(output)))
  assert list(tmp_path.iterdir()) == []


def test_generate_mode_prints_text_speed_and_memory(run_dir, capsys):
  root, config, _, _ = run_dir
  prompts = root / "prompts.txt"
  prompts.write_text("def \n\nThe value\n")
  output = root / "samples.jsonl"
  args = RunArgs(workdir=str(root / "work"), prompts_file=str(prompts), output=str(output))
  assert generate_mode.run(config, args) == 0
  out = capsys.readouterr().out
  assert "tokens/s" in out and "peak memory" in out
  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r["prompt"] for r in records] == ["def ", "The value"]
  assert all(0 <= r["new_tokens"] <= 8 for r in records)


def test_generate_mode_names_a_missing_prompts_file(run_dir):
  root, config, _, _ = run_dir
  args = dataclasses.replace(RunArgs(workdir=str(root / "work")), prompts_file=str(root / "nope.txt"))
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    generate_mode.run(config, args)


def test_a_checkpoint_restores_sharded_on_another_device_count(run_dir):
  root, config, _, _ = run_dir
  script = textwrap.dedent(f"""
      import json, jax
      from flax import nnx
      from neon_qtg_jax.inference.restore import load_model
      from neon_qtg_jax.inference.sampling import SamplingParams, continue_prompts
      from neon_qtg_jax.parallel import ShardingConfig
      restored = load_model({str(root / "work")!r}, "best", sharding=ShardingConfig.all_fsdp())
      specs = sorted({{str(x.sharding.spec) for x in jax.tree.leaves(nnx.state(restored.model))}})
      tokens = continue_prompts(restored.model, [[5, 6, 7], [8]], sampling_cfg=SamplingParams(temperature=0.0),
                                max_new_tokens=4, eos_id=None, seed=0, sharding=restored.sharding)
      print(json.dumps({{"devices": jax.device_count(), "specs": specs, "tokens": tokens}}))
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  other = json.loads(run.stdout.strip().splitlines()[-1])
  assert other["devices"] == 4 and any("fsdp" in spec for spec in other["specs"])
  here = load_model(str(root / "work"), "best", sharding=ShardingConfig.all_fsdp()).model
  greedy = SamplingParams(temperature=0.0)
  assert other["tokens"] == continue_prompts(here, [[5, 6, 7], [8]], sampling_cfg=greedy, max_new_tokens=4, eos_id=None,
                                             seed=0, sharding=ShardingConfig.all_fsdp())


def test_bf16_eval_scores_the_model_that_training_evaluated(run_dir, tmp_path, monkeypatch):
  # A bf16 config: training holds float32 parameters and computes in bf16. --mode=eval must
  # compute the same validation loss on the same windows (the training loop's eval batches).
  from neon_qtg_jax.data import loader
  from neon_qtg_jax.inference import restore
  from neon_qtg_jax.training import train_step as ts
  from neon_qtg_jax.training.hooks import evaluate

  _, base, _, _ = run_dir
  config = ml_collections.ConfigDict(base.to_dict())
  config.model.update(dict(dtype="bfloat16", use_bias=True))
  config.training.update(dict(batch_size=4, eval_batches=2))
  sharding = ShardingConfig.from_config(config.parallel)
  graphdef, state = ts.create_train_state(config, jax.random.PRNGKey(0), sharding)
  # A trained model's LayerNorm scales, biases and weights are not bf16-exact: perturb them so.
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  checkpointer = Checkpointer(str(tmp_path / "work"), keep=2)
  checkpointer.save(5, params=params, opt_state=state.opt_state, meta={"step": 5}, config=config, val_loss=1.0)
  checkpointer.close()

  batches = loader.eval_batches(config)
  training = evaluate(ts.make_eval_step(config, graphdef, sharding), params,
                      [jax.device_put(b) for b in batches])["ce"]
  restored = load_model(str(tmp_path / "work"), "best", config, sharding=sharding)
  log_probs = perplexity.model_log_prob_fn(restored.model)
  loss = -float(np.mean([np.mean(log_probs(b["inputs"], b["targets"])) for b in batches]))
  assert restored.param_dtype == "float32" and restored.model.cfg.dtype == "bfloat16"
  assert abs(loss - training) < 1e-3, (loss, training)
  print(f"training val ce {training:.6f}; --mode=eval's ce on the same windows {loss:.6f}")
  # "auto" keeps float32 while it fits in half a device's memory, else uses the compute dtype (and says so)
  abstract = nnx.state(nnx.eval_shape(lambda: QTGModel(config.model, rngs=nnx.Rngs(0))))
  assert restore.choose_param_dtype(config.model, abstract, "auto") == jnp.float32
  monkeypatch.setattr(restore, "device_memory_bytes", lambda: 1 << 10)
  assert restore.choose_param_dtype(config.model, abstract, "auto") == jnp.bfloat16
