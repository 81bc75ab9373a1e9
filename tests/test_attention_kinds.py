"""Attention kinds (model/attention/): a kind defined in this file alone trains, decodes with the cache,
draws its maps and counts its FLOPs; `cosine` is geo's second-order twin and its paths agree."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neon_qtg_jax import info, ops
from neon_qtg_jax.analysis import layer_traces
from neon_qtg_jax.config import ConfigError, default_config, validate
from neon_qtg_jax.inference import decoding
from neon_qtg_jax.model import QTGModel
from neon_qtg_jax.model import attention as attention_kinds
from neon_qtg_jax.model.attention.cosine import centred, cosine_scores
from neon_qtg_jax.ops import measure
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.training import train_step as ts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

VOCAB = 61


class UnitDot(attention_kinds.AttentionKind):
  """A toy kind: q and k scaled to unit length, score = t_h q^ . k^ with a learned per-head t_h."""

  name = "toy_unit_dot"
  display_name = "toy unit-vector dot product"

  def init_params(self, attn, cfg):
    attn.toy_temperature = nnx.Param(jnp.full((cfg.num_heads,), 3.0, jnp.float32))

  def learned_scales(self, attn):
    return {"toy_temperature": attn.toy_temperature[...]}

  def scales_per_head(self, cfg):
    return 1

  def score_params(self, attn):
    return attn.toy_temperature[...]

  def query(self, q, dtype):
    q = q.astype(jnp.float32)
    return (q / jnp.linalg.norm(q, axis=-1, keepdims=True)).astype(dtype)

  key = query  # the cache stores unit keys

  def scores(self, a, b, p):
    return p[None, :, None, None] * jnp.einsum("bqhd,bkhd->bhqk", a, b, preferred_element_type=jnp.float32)

  def flops_per_query(self, attention_dim, keys):
    return 5.0 * attention_dim * keys  # distinguishable from the default's 4 attention_dim per key


@pytest.fixture
def toy_kind():
  kind = attention_kinds.register(UnitDot())
  yield kind
  attention_kinds.unregister(kind.name)


def small_config(attention: str, **model):
  c = default_config()
  c.model.update(dict(vocab_size=VOCAB, embed_dim=16, num_layers=2, num_heads=2, max_seq_len=32, init_std=0.2,
                      attention=attention))
  c.model.update(model)
  c.data.update(max_length=16, stride=8)
  c.eval.update(max_length=16, stride=8)
  c.training.update(batch_size=4, warmup_steps=2, total_steps=50, lr=1e-2)
  return validate(c)


def assert_cached_decoding_matches_the_full_pass(model: QTGModel, tol: float = 2e-5) -> None:
  """Left-padded prefill, then one token at a time: the same logits as the full forward pass."""
  rows = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
  prompt_lens = [6, 3]
  slots = max(prompt_lens)
  full = [np.asarray(model(jnp.asarray(row[None]))[0]) for row in rows]
  step = nnx.jit(decoding.forward_cached)
  tokens, positions, valid = decoding.left_pad([list(r[:n]) for r, n in zip(rows, prompt_lens)], slots)
  logits, cache = step(model, decoding.init_cache(model, 2, slots + 12), tokens, positions, 0, valid)
  for b, n in enumerate(prompt_lens):
    np.testing.assert_allclose(logits[b, slots - n:], full[b][:n], atol=tol, rtol=tol)
  for i in range(12 - slots):
    token = jnp.asarray([[rows[b, n + i]] for b, n in enumerate(prompt_lens)], jnp.int32)
    pos = jnp.asarray([[n + i] for n in prompt_lens], jnp.int32)
    logits, cache = step(model, cache, token, pos, slots + i, jnp.ones((2, 1), bool))
    for b, n in enumerate(prompt_lens):
      np.testing.assert_allclose(logits[b, 0], full[b][n + i], atol=tol, rtol=tol, err_msg=f"row {b}, step {i}")


def test_a_kind_from_this_file_trains_decodes_draws_its_maps_and_counts_its_flops(toy_kind, tmp_path):
  config = small_config(toy_kind.name)  # validation reads the registry: the new name is accepted

  # trains: the project's own train step
  sharding = ShardingConfig.from_config(config.parallel)
  graphdef, state = ts.create_train_state(config, jax.random.PRNGKey(0), sharding)
  step = ts.make_train_step(config, graphdef, sharding)
  starts = np.random.default_rng(0).integers(0, VOCAB, (4, 1))
  tokens = ((starts + np.arange(17)) % VOCAB).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  before = np.asarray(state.params["blocks"]["attn"]["toy_temperature"][...])
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch)
    losses.append(float(metrics["ce"]))
  assert losses[-1] < 0.6 * losses[0]
  assert not np.allclose(np.asarray(state.params["blocks"]["attn"]["toy_temperature"][...]), before)
  model = nnx.merge(graphdef, state.params)

  # decodes with the cache (unit keys stored), equal to the full recomputation
  assert_cached_decoding_matches_the_full_pass(model)

  # draws its maps: the probabilities its attention computed, and the picture of them
  traces = layer_traces(model, jnp.asarray(tokens[:2, :12]))
  probs = traces["attention"]
  assert probs.shape == (2, 2, 2, 12, 12) and "gamma" not in traces
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.triu(probs, k=1) == 0.0)
  import analyze  # tools/analyze.py
  analyze.plot_attention(probs[:, 0], f"{toy_kind.display_name}", str(tmp_path / "attention.png"))
  assert (tmp_path / "attention.png").stat().st_size > 0
  assert model.learned_scales()["toy_temperature"].shape == (2, 2)

  # counts its FLOPs and parameters
  flops = info.flops_per_token(config)
  assert flops["attention"] == 2 * 5.0 * 16 * (16 / 2)
  assert info.spec_block_parameters(config.model) == info.spec_block_parameters(small_config("dot").model) + 2


def test_unknown_kinds_are_refused_naming_the_registered_ones():
  with pytest.raises(ConfigError, match=r"model.attention.*'geo', 'dot', 'cosine'"):
    small_config("nope")
  with pytest.raises(ValueError, match="model.attention='nope'"):
    attention_kinds.get("nope")


def test_registry_lists_the_built_in_kinds():
  assert attention_kinds.names()[:3] == ("geo", "dot", "cosine")
  assert attention_kinds.get("cosine").display_name.startswith("cosine")


@pytest.mark.parametrize("beta_scale", [1.0])
def test_cosine_is_the_second_order_expansion_of_the_fisher_rao_score(beta_scale):
  """-(gamma/4) Var_d(a - b) and -gamma arccos(BC)^2 of the same inputs agree to second order: their
  relative difference shrinks in proportion to the inputs' scale beta."""
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  a0 = jax.random.normal(keys[0], (1, 8, 2, 16))
  b0 = jax.random.normal(keys[1], (1, 8, 2, 16))
  gamma = jnp.array([8.0, 2.0])
  errors = []
  for beta in (0.4, 0.2, 0.1, 0.05):
    a, b = beta_scale * beta * a0, beta_scale * beta * b0
    geo = ops.geo_scores(ops.sqrt_probs(a), ops.sqrt_probs(b), gamma)
    cos = cosine_scores(centred(a, jnp.float32), centred(b, jnp.float32), gamma)
    errors.append(float(jnp.max(jnp.abs(geo - cos)) / jnp.max(jnp.abs(cos))))
  ratios = [errors[i] / errors[i + 1] for i in range(3)]
  assert errors[-1] < 0.03
  assert all(1.6 < r < 2.5 for r in ratios), (errors, ratios)  # first order in beta: the cubic term


def test_cosine_blockwise_matches_its_reference_in_values_and_gradients():
  kind = attention_kinds.get("cosine")
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  q, k, v = (jax.random.normal(key, (2, 21, 3, 8)) for key in keys[:3])
  cot = jax.random.normal(keys[3], (2, 21, 3, 8))
  gamma = jnp.array([1.0, 8.0, 30.0])
  reference = functools.partial(kind.attend, impl="reference", block_q=8, block_k=8)
  fast = functools.partial(kind.attend, impl="blockwise", block_q=8, block_k=4)
  ref = jax.jit(measure.loss_and_grads(reference, 4))(q, k, v, gamma, cot)
  out = jax.jit(measure.loss_and_grads(fast, 4))(q, k, v, gamma, cot)
  for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
    np.testing.assert_allclose(x, y, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(kind.attend(q, k, v, gamma, impl="pallas", block_q=8, block_k=8),  # blockwise off GPU
                             kind.attend(q, k, v, gamma, impl="reference", block_q=8, block_k=8), atol=2e-5)


def test_cosine_shares_geos_parameters_so_a_geo_checkpoint_loads_as_cosine():
  geo = QTGModel(small_config("geo").model, rngs=nnx.Rngs(0))
  cos = QTGModel(small_config("cosine").model, rngs=nnx.Rngs(0))
  same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), nnx.state(geo, nnx.Param), nnx.state(cos, nnx.Param))
  assert all(jax.tree.leaves(same))
  assert not np.allclose(geo(jnp.ones((1, 8), jnp.int32)), cos(jnp.ones((1, 8), jnp.int32)))
