"""The train step, optimizer and checkpoints in-process, on a tiny model and synthetic tokens."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.checkpoint import checkpointer as checkpointing
from neon_qtg_jax.training import optimizer
from neon_qtg_jax.training import train_step as ts


def tiny_config(**training):
  c = default_config()
  c.model.update(vocab_size=64, embed_dim=16, num_layers=1, num_heads=2, max_seq_len=16)
  c.data.update(max_length=16, stride=8)
  c.eval.update(max_length=16, stride=8)
  c.training.update(batch_size=4, warmup_steps=2, total_steps=50, lr=1e-2)
  c.training.update(training)
  return validate(c)


def random_batch(seed: int, rows: int, length: int = 16, vocab: int = 64) -> dict[str, np.ndarray]:
  tokens = np.random.default_rng(seed).integers(0, vocab, (rows, length + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@pytest.fixture(scope="module")
def compiled():
  """One tiny config with its graphdef, compiled train step and eval step, shared by the tests below."""
  c = tiny_config()
  graphdef = ts.model_graphdef(c)
  sharding = ShardingConfig.from_config(c.parallel)
  return c, graphdef, ts.make_train_step(c, graphdef, sharding), ts.make_eval_step(c, graphdef, sharding)


def copy_tree(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def trees_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_schedule_warmup_then_cosine():
  c = tiny_config(lr=1e-3, end_lr=1e-5, warmup_steps=10, total_steps=100)
  schedule = optimizer.learning_rate_schedule(c.training)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5e-3, rel=1e-6)
  assert float(schedule(10)) == pytest.approx(1e-3, rel=1e-6)
  assert float(schedule(55)) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize("warmup,total", [(0, 20), (10, 100), (50, 600), (19, 20)])
def test_a_warmup_shorter_than_the_run_is_optaxs_schedule_unchanged(warmup, total):
  """Runs whose warmup_steps < total_steps (all that validated before the clamp, bar warmup == total, which
  failed in optax) get optax's schedule bit for bit, so their losses are those of before."""
  c = tiny_config(lr=3e-3, end_lr=1e-5, warmup_steps=warmup, total_steps=total)
  ours = optimizer.learning_rate_schedule(c.training)
  optax_own = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=3e-3, warmup_steps=warmup,
                                                 decay_steps=total, end_value=1e-5)
  steps = jnp.arange(total + 5)
  assert np.array_equal(np.asarray(jax.vmap(ours)(steps)), np.asarray(jax.vmap(optax_own)(steps)))
  assert optimizer.schedule_note(c.training) is None


@pytest.mark.parametrize("warmup", [50, 20])
def test_a_warmup_as_long_as_the_run_or_longer_is_clamped_to_it_with_a_note(warmup):
  """--config.training.total_steps=20 with the default warmup_steps 50: valid, the warmup is the whole run."""
  c = tiny_config(lr=3e-3, end_lr=1e-5, warmup_steps=warmup, total_steps=20)  # validates
  assert optimizer.warmup_steps(c.training) == 20
  schedule = optimizer.learning_rate_schedule(c.training)
  assert [float(schedule(k)) for k in (0, 10, 20, 25)] == pytest.approx([0.0, 1.5e-3, 3e-3, 3e-3], rel=1e-6)
  note = optimizer.schedule_note(c.training)
  assert "warmup takes all 20 steps" in note and ("clamped" in note) == (warmup > 20)
  params = {"w": jnp.ones((2, 2))}
  opt = optimizer.make_optimizer(c.training)
  updates, _ = opt.update({"w": jnp.ones((2, 2))}, opt.init(params), params)
  assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_weight_decay_only_on_matrices():
  c = tiny_config()
  c.model.use_bias = True
  mask = optimizer.weight_decay_mask(ts.abstract_train_state(c).params).to_pure_dict()
  assert mask["blocks"]["attn"]["w_qkv"]["kernel"] and mask["head"]["kernel"]
  assert mask["embed"]["tokens"]["embedding"] and mask["embed"]["positions"]
  assert not mask["blocks"]["attn"]["w_qkv"]["bias"] and not mask["blocks"]["attn"]["gamma_raw"]
  assert not mask["blocks"]["ln1"]["scale"] and not mask["ln_f"]["bias"]


def test_loss_falls_on_a_learnable_sequence(compiled):
  c, _, step, _ = compiled
  _, state = ts.create_train_state(c, jax.random.PRNGKey(0), ShardingConfig.from_config(c.parallel))
  # Each sequence counts upward modulo the vocabulary from a random start: next token = token + 1.
  starts = np.random.default_rng(0).integers(0, 64, (4, 1))
  tokens = ((starts + np.arange(17)) % 64).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch)
    losses.append(float(metrics["ce"]))
  assert losses[0] > math.log(64) - 0.5
  assert losses[-1] < 0.5 * losses[0]


def test_accumulation_equals_one_large_batch():
  c = tiny_config(batch_size=8)
  batch = random_batch(1, 8)
  graphdef, state = ts.create_train_state(c, jax.random.PRNGKey(0), ShardingConfig.from_config(c.parallel))
  weights = ts.LossWeights.from_config(c.training)
  grads = {k: jax.jit(lambda p, b, k=k: ts.accumulated_grads(graphdef, p, b, weights, k, None))(state.params, batch)
           for k in (1, 4)}
  (g1, t1), (g4, t4) = grads[1], grads[4]
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  for term in ts.LOSS_TERMS:
    np.testing.assert_allclose(t1[term], t4[term], rtol=1e-5)


def test_nonfinite_step_leaves_state_unchanged(monkeypatch):
  c = tiny_config()
  poison = 63
  clean_loss = ts.loss_fn

  def loss_with_injected_nan(graphdef, params, batch, weights, key):
    loss, terms = clean_loss(graphdef, params, batch, weights, key)
    nan_if_poisoned = jnp.where(jnp.any(batch["inputs"] == poison), jnp.nan, 1.0)
    return loss * nan_if_poisoned, terms | {"loss": loss * nan_if_poisoned}

  monkeypatch.setattr(ts, "loss_fn", loss_with_injected_nan)
  graphdef, state = ts.create_train_state(c, jax.random.PRNGKey(0), ShardingConfig.from_config(c.parallel))
  step = ts.make_train_step(c, graphdef, ShardingConfig.from_config(c.parallel))
  good = random_batch(0, 4, vocab=60)
  bad = dict(good, inputs=good["inputs"].copy())
  bad["inputs"][0, 3] = poison

  state, metrics = step(state, good)
  assert bool(metrics["finite"])
  params, opt_state = copy_tree(state.params), copy_tree(state.opt_state)
  for _ in range(2):
    state, metrics = step(state, bad)
    assert not bool(metrics["finite"])
  assert trees_equal(state.params, params) and trees_equal(state.opt_state, opt_state)
  assert (int(state.step), int(state.nonfinite_streak), int(state.nonfinite_total)) == (3, 2, 2)
  state, metrics = step(state, good)
  assert bool(metrics["finite"]) and not trees_equal(state.params, params)
  assert (int(state.nonfinite_streak), int(state.nonfinite_peak)) == (0, 2)


def test_restore_gives_the_same_validation_loss(tmp_path, compiled):
  c, _, step, eval_step = compiled
  _, state = ts.create_train_state(c, jax.random.PRNGKey(0), ShardingConfig.from_config(c.parallel))
  for seed in range(3):
    state, _ = step(state, random_batch(seed, 4))
  val = random_batch(99, 4)
  before = jax.device_get(eval_step(state.params, val))
  saver = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  saver.save(3, params=state.params, opt_state=state.opt_state, meta={"step": 3}, config=c,
             val_loss=float(before["loss"]))
  saver.close()

  _, fresh = ts.create_train_state(c, jax.random.PRNGKey(1), ShardingConfig.from_config(c.parallel))
  restored = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=2).restore(
      3, params=fresh.params, opt_state=fresh.opt_state)
  assert trees_equal(restored["opt_state"], state.opt_state)
  after = jax.device_get(eval_step(restored["params"], val))
  assert float(after["loss"]) == float(before["loss"])

  abstract = nnx.state(nnx.eval_shape(lambda: ts.QTGModel(c.model, rngs=nnx.Rngs(0))))
  params, found = checkpointing.restore_params(str(tmp_path), "best", abstract)
  assert found == 3 and trees_equal(params, state.params)
  assert checkpointing.load_run_config(str(tmp_path)).model.embed_dim == 16


# Orbax's failed read of the corrupt step leaves an asyncio callback that fires after its loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_keeps_last_k_plus_best_and_falls_back_from_a_corrupt_step(tmp_path, caplog):
  c = tiny_config()
  _, state = ts.create_train_state(c, jax.random.PRNGKey(0), ShardingConfig.from_config(c.parallel))
  saver = checkpointing.Checkpointer(str(tmp_path), keep=2)
  for step, val_loss in ((1, 3.0), (2, 1.0), (3, None), (4, 2.0), (5, None)):
    saver.save(step, params=state.params, opt_state=state.opt_state, meta={"step": step}, config=c,
               val_loss=val_loss)
  saver.wait()
  assert saver.steps() == [2, 4, 5]
  assert checkpointing.resolve(str(tmp_path), "best").step == 2
  for path in (tmp_path / "5" / "params").rglob("*"):
    if path.is_file() and "metadata" not in path.name.lower():
      path.write_bytes(b"corrupt")
  with caplog.at_level("WARNING"):
    step, restored = saver.restore_latest_good(saver.steps(), params=state.params, opt_state=state.opt_state)
  assert step == 4 and restored["meta"] == {"step": 4}
  assert "checkpoint" in caplog.text and "/5 is unreadable" in caplog.text
  saver.close()


def test_dropout_keys_come_from_the_state_rng_and_step():
  c = tiny_config()
  c.model.dropout = 0.3
  graphdef, state = ts.create_train_state(c, jax.random.PRNGKey(0), ShardingConfig.from_config(c.parallel))
  step = jax.jit(ts.train_step_fn(c, graphdef))  # not donated: the same state is stepped twice
  batch = random_batch(0, 4)
  _, first = step(state, batch)
  _, again = step(state, batch)
  _, next_step = step(state.replace(step=state.step + 1), batch)
  clean = ts.make_eval_step(c, graphdef, ShardingConfig.from_config(c.parallel))(state.params, batch)
  assert float(first["loss"]) == float(again["loss"])  # reproducible, so a resumed run sees the same masks
  assert float(first["loss"]) != float(next_step["loss"])  # a new mask every step
  assert float(first["ce"]) != float(clean["ce"])  # dropout is on in training, off in evaluation
