"""QTGModel: API contract, causality, baseline switches, scan/remat/bf16 options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neon_qtg_jax import info
from neon_qtg_jax.config import complete_saved_config, default_config
from neon_qtg_jax.model import QTGModel
from neon_qtg_jax.model.qtg import positive_scale, rms_normalize


def small_model_config(**overrides):
  m = default_config().model
  m.vocab_size, m.embed_dim, m.num_layers, m.num_heads, m.max_seq_len = 97, 16, 2, 2, 32
  for key, value in overrides.items():
    m[key] = value
  return m


def random_tokens(seed, shape=(2, 20), vocab=97):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


def test_contract_shapes_and_dtypes():
  cfg = small_model_config()
  model = QTGModel(cfg, rngs=nnx.Rngs(0))
  logits, aux = model(random_tokens(0), return_aux=True)
  assert logits.shape == (2, 20, 97) and logits.dtype == jnp.float32
  assert aux["s"].shape == (2, 2, 20) and aux["residual"].shape == (2, 20, 32)
  np.testing.assert_array_equal(model(random_tokens(0)), logits)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("overrides", [
    {},
    {"topo_k": 3},
    {"attention": "dot", "topofilter": False},
    {"attention": "dot", "topofilter": False, "w_psi": False, "amplitude_embedding": False},
    {"scan_layers": True, "remat": "block"},
    {"sphere_map": "scaled", "beta": 3.0},
    {"sphere_map": "normed", "beta": 2.0},
    {"sphere_map": "seed", "w_psi_init": "normal"},
    {"attention": "dot", "topofilter": False, "w_psi": False, "amplitude_embedding": False,
     "attention_width": "residual", "mlp_ratio": 8, "tie_embeddings": True},
])
def test_causality(overrides):
  model = QTGModel(small_model_config(**overrides), rngs=nnx.Rngs(1))
  tokens = random_tokens(2)
  base = model(tokens)
  for t in (0, 7, 18):
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 13) % 97)
    logits = model(changed)
    np.testing.assert_allclose(logits[:, : t + 1], base[:, : t + 1], atol=1e-5)
    assert not np.allclose(logits[:, t + 1:], base[:, t + 1:], atol=1e-5)


def test_baseline_switches():
  model = QTGModel(small_model_config(attention="dot", topofilter=False), rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert "gamma_raw" not in params["blocks"]["attn"]
  _, aux = model(random_tokens(0), return_aux=True)
  np.testing.assert_array_equal(aux["s"], 0.0)


def test_standard_gpt_switches_drop_w_psi_and_the_embedding_normalization():
  baseline = QTGModel(small_model_config(attention="dot", topofilter=False), rngs=nnx.Rngs(0))
  gpt = QTGModel(small_model_config(attention="dot", topofilter=False, w_psi=False, amplitude_embedding=False),
                 rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(gpt, nnx.Param))
  assert "w_psi" not in params["blocks"]
  count = lambda model: sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  d, layers = 16, 2
  assert count(baseline) - count(gpt) == layers * (2 * d) ** 2
  tokens = random_tokens(3)
  positions = jnp.broadcast_to(jnp.arange(20), tokens.shape)
  expected = params["embed"]["tokens"]["embedding"][tokens] + params["embed"]["positions"][positions]
  np.testing.assert_allclose(gpt.embed(tokens, positions), expected, rtol=1e-6)
  # Without W_psi the attention reads LN_1(h) itself.
  h = jax.random.normal(jax.random.key(4), (2, 20, 2 * d))
  block = nnx.merge(*nnx.split(gpt.blocks))
  first = jax.tree.map(lambda x: x[0], nnx.state(block))
  layer = nnx.merge(nnx.graphdef(block), first)
  np.testing.assert_allclose(layer.psi(h), layer.ln1(h), rtol=1e-6)


def test_scan_and_remat_give_the_same_values_and_gradients():
  tokens = random_tokens(3)
  def loss_and_grad(**overrides):
    model = QTGModel(small_model_config(**overrides), rngs=nnx.Rngs(4))
    graphdef, params = nnx.split(model)
    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
    return jax.value_and_grad(loss)(params)
  ref_loss, ref_grad = loss_and_grad()
  for overrides in ({"scan_layers": True}, {"remat": "block"}, {"scan_layers": True, "remat": "dots"}):
    value, grad = loss_and_grad(**overrides)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_compute_keeps_fp32_params_and_close_logits():
  tokens = random_tokens(5)
  fp32 = QTGModel(small_model_config(), rngs=nnx.Rngs(6))(tokens)
  model = QTGModel(small_model_config(dtype="bfloat16"), rngs=nnx.Rngs(6))
  bf16 = model(tokens)
  assert bf16.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  np.testing.assert_allclose(bf16, fp32, atol=0.05)


def test_gamma_is_learned_positive_and_can_be_frozen():
  tokens = random_tokens(7)
  for learn in (True, False):
    model = QTGModel(small_model_config(gamma=8.0, learn_gamma=learn), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(jax.nn.softplus(model.blocks.attn.gamma_raw[...]), 8.0, rtol=1e-6)
    graphdef, params = nnx.split(model)
    grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens) ** 2))(params)
    gamma_grad = grad["blocks"]["attn"]["gamma_raw"][...]
    assert (np.abs(gamma_grad).max() > 0) == learn


def test_dropout_only_with_a_key():
  model = QTGModel(small_model_config(dropout=0.5), rngs=nnx.Rngs(0))
  tokens = random_tokens(8)
  np.testing.assert_array_equal(model(tokens), model(tokens))
  a = model(tokens, dropout_key=jax.random.key(1))
  b = model(tokens, dropout_key=jax.random.key(2))
  assert not np.allclose(a, b)


def test_embedding_is_unit_norm():
  model = QTGModel(small_model_config(), rngs=nnx.Rngs(0))
  tokens = random_tokens(9)
  positions = jnp.broadcast_to(jnp.arange(20), tokens.shape)
  x = model.embed(tokens, positions)
  np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("sphere_map", ["scaled", "normed"])
def test_sphere_map_inputs_are_scaled_and_normalized_per_head(sphere_map):
  model = QTGModel(small_model_config(sphere_map=sphere_map, beta=2.5), rngs=nnx.Rngs(0))
  attn = nnx.merge(nnx.graphdef(model.blocks.attn), jax.tree.map(lambda x: x[0], nnx.state(model.blocks.attn)))
  np.testing.assert_allclose(attn.beta(), 2.5, rtol=1e-6)
  f = jax.random.normal(jax.random.key(1), (2, 20, 32))
  raw = attn.w_qkv(f)
  q, k, v = attn.project(f)
  expected_q = 2.5 * (rms_normalize(raw[:, :, 0], attn.eps) if sphere_map == "normed" else raw[:, :, 0])
  np.testing.assert_allclose(q, expected_q, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(v, raw[:, :, 2])
  if sphere_map == "normed":  # every head's q has RMS beta, whatever the scale of W_Q
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(k ** 2, axis=-1)), 2.5, rtol=1e-3)


def test_seed_sphere_map_has_no_beta_and_is_the_default_for_old_checkpoints():
  model = QTGModel(small_model_config(sphere_map="seed"), rngs=nnx.Rngs(0))
  assert "beta_raw" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))["blocks"]["attn"]
  saved = default_config()
  for name in ("sphere_map", "beta", "scale_param", "scale_lr_mult", "qk_init_std", "attention_width",
               "tie_embeddings"):
    del saved.model[name]
  completed = complete_saved_config(saved)
  assert completed.model.sphere_map == "seed" and completed.model.attention_width == "complex"
  assert not completed.model.tie_embeddings


@pytest.mark.parametrize("param", ["softplus", "exp"])
def test_positive_scales_start_at_their_value_and_lr_mult_scales_the_step(param):
  model = QTGModel(small_model_config(sphere_map="normed", gamma=6.0, beta=1.5, scale_param=param,
                                      scale_lr_mult=4.0), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(model.blocks.attn.gamma(), 6.0, rtol=1e-5)
  np.testing.assert_allclose(model.blocks.attn.beta(), 1.5, rtol=1e-5)
  # d scale / d raw is lr_mult times the map's own slope: a step of size s on raw moves the scale's
  # pre-image by lr_mult * s.
  raw = model.blocks.attn.beta_raw[...][0, 0]
  slope = jax.grad(lambda r: positive_scale(r, param, 4.0))(raw)
  one = jax.grad(lambda r: positive_scale(r, param, 1.0))(4.0 * raw)
  np.testing.assert_allclose(slope, 4.0 * one, rtol=1e-5)


def test_qk_init_std_sets_the_query_and_key_weights_only():
  model = QTGModel(small_model_config(qk_init_std=0.5, init_std=0.02), rngs=nnx.Rngs(0))
  kernel = model.blocks.attn.w_qkv.kernel[...]  # (layers, 2d, 3, H, hd)
  stds = [float(jnp.std(kernel[:, :, i])) for i in range(3)]
  assert 0.4 < stds[0] < 0.6 and 0.4 < stds[1] < 0.6 and 0.015 < stds[2] < 0.025


def test_standard_shape_gpt_has_wide_attention_a_4x_ffn_and_tied_embeddings():
  cfg = small_model_config(attention="dot", topofilter=False, w_psi=False, amplitude_embedding=False,
                           attention_width="residual", mlp_ratio=8, tie_embeddings=True)
  model = QTGModel(cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  d, width = 16, 32
  assert params["blocks"]["attn"]["w_qkv"]["kernel"].shape == (2, width, 3, 2, width // 2)
  assert params["blocks"]["w_o"]["kernel"].shape == (2, width, width)
  assert params["blocks"]["w_1"]["kernel"].shape == (2, width, 4 * width)
  assert "head" not in params
  count = sum(x.size for x in jax.tree.leaves(params))
  per_block = info.spec_block_parameters(cfg)
  assert count == 2 * per_block + 97 * width + 32 * width + 2 * width  # blocks, table, positions, LN_f
  tokens = random_tokens(1)
  logits, aux = model(tokens, return_aux=True)
  expected = jnp.einsum("blc,vc->blv", model.ln_f(aux["residual"]), params["embed"]["tokens"]["embedding"])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sphere_map", ["seed", "normed"])
def test_reference_and_blockwise_models_agree(sphere_map):
  tokens = random_tokens(11, shape=(2, 30))
  ref = QTGModel(small_model_config(sphere_map=sphere_map, attention_impl="reference"), rngs=nnx.Rngs(3))
  fast = QTGModel(small_model_config(sphere_map=sphere_map, attention_impl="blockwise", block_q=8, block_k=16),
                  rngs=nnx.Rngs(3))
  np.testing.assert_allclose(fast(tokens), ref(tokens), atol=2e-5, rtol=1e-5)


def test_orthogonal_w_psi_keeps_the_norm_of_every_state():
  model = QTGModel(small_model_config(w_psi_init="orthogonal"), rngs=nnx.Rngs(0))
  kernel = model.blocks.w_psi.kernel[...]  # (layers, 2d, 2d)
  for layer in kernel:
    np.testing.assert_allclose(layer @ layer.T, np.eye(32), atol=1e-5)
  normal = QTGModel(small_model_config(w_psi_init="normal", init_std=0.02), rngs=nnx.Rngs(0))
  assert 0.015 < float(jnp.std(normal.blocks.w_psi.kernel[...])) < 0.025
