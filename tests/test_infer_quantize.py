"""int8 weights (inference/quantize.py): every matmul kernel found by type, per-channel scales, the same math as a
matmul with the dequantized kernel, and the model's outputs close to the float ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from neon_qtg_jax.config import ConfigError, apply_assignments, default_config, validate
from neon_qtg_jax.inference import decoding, quantize
from neon_qtg_jax.model import QTGModel


def small_model(**overrides) -> QTGModel:
  m = default_config().model
  m.update(dict(vocab_size=97, embed_dim=32, num_layers=2, num_heads=2, max_seq_len=32))
  m.update(overrides)
  return QTGModel(m, rngs=nnx.Rngs(0))


class Mixed(nnx.Module):
  """One of each matmul module, with a bias, batch axes and an einsum, none of them named like the model's."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(8, 12, use_bias=True, rngs=rngs)
    self.general = nnx.LinearGeneral((12,), (3, 4), axis=-1, rngs=rngs)
    self.mix = nnx.Einsum("btk,khd->bthd", (12, 2, 5), rngs=rngs)

  def __call__(self, x):
    h = self.dense(x)
    return self.general(h).reshape(*h.shape[:-1], 12), self.mix(h)


def test_every_matmul_module_is_found_by_type_and_computes_with_its_dequantized_kernel():
  model = Mixed(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  assert quantize.quantize_kernels(model) == 3
  dense, general, mix = model.dense, model.general, model.mix
  for module, contracted in ((dense, (0,)), (general, (0,)), (mix, (0,))):
    assert isinstance(module.kernel, quantize.Int8Kernel)
    assert module.kernel.qvalue.dtype == jnp.int8
    scale = module.kernel.scale[...]
    assert all(scale.shape[a] == 1 for a in contracted)  # one scale per output channel
    assert scale.shape[1:] == module.kernel.qvalue.shape[1:]

  def dq(module):
    return qwix.dequantize(module.kernel[...])
  h = x @ dq(dense) + dense.bias[...]
  want_general = jnp.einsum("btk,khd->bthd", h, dq(general)).reshape(2, 5, 12)
  want_mix = jnp.einsum("btk,khd->bthd", h, dq(mix))
  got_general, got_mix = model(x)
  np.testing.assert_allclose(got_general, want_general, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_mix, want_mix, rtol=1e-5, atol=1e-5)


def test_int8_kernels_of_stacked_layers_have_scales_per_layer_and_channel():
  model = quantize.apply_weight_dtype(small_model(), "int8")
  kernels = {"/".join(map(str, p)): m.kernel for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)}
  assert set(kernels) == {"blocks/w_psi", "blocks/w_o", "blocks/w_1", "blocks/w_2", "head"}
  assert isinstance(model.blocks.attn.w_qkv.kernel, quantize.Int8Kernel)
  assert model.blocks.w_1.kernel.scale.shape == (2, 1, 128)      # (layers, contracted, out)
  assert model.blocks.attn.w_qkv.kernel.scale.shape == (2, 1, 3, 2, 16)
  assert model.head.kernel.scale.shape == (1, 97)
  params = nnx.state(model, nnx.Param)
  dtypes = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  assert all(d == jnp.int8 for k, d in dtypes.items() if "qvalue" in k)
  assert all(d == jnp.float32 for k, d in dtypes.items() if "'scale'" in k and "kernel" in k)
  assert all(d == jnp.bfloat16 for k, d in dtypes.items() if "kernel" not in k)  # norms, embeddings, gamma


def test_int8_model_logits_are_close_to_float_and_cached_decoding_matches_its_forward_pass():
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 97)
  reference = small_model()(tokens)
  model = quantize.apply_weight_dtype(small_model(), "int8")
  logits = model(tokens)
  assert float(jnp.max(jnp.abs(logits - reference))) < 0.05 * float(jnp.max(jnp.abs(reference)))
  cache = decoding.init_cache(model, 2, 12)
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  cached, _ = nnx.jit(decoding.forward_cached)(model, cache, tokens, positions, 0, jnp.ones((2, 12), bool))
  np.testing.assert_allclose(cached, logits, atol=5e-5, rtol=5e-5)


def test_weight_storage_sizes():
  sizes = {w: quantize.parameter_bytes(quantize.apply_weight_dtype(small_model(), w))
           for w in ("float32", "bfloat16", "int8")}
  assert sizes["bfloat16"] * 2 == sizes["float32"]
  assert sizes["int8"] < 0.7 * sizes["bfloat16"]
  graphdef, abstract = quantize.abstract_inference_model(small_model().cfg, "int8")
  assert abstract["blocks"]["w_1"]["kernel"]["qvalue"].dtype == jnp.int8  # shapes only, nothing allocated
  assert isinstance(abstract["blocks"]["w_1"]["kernel"]["qvalue"].get_value(), jax.ShapeDtypeStruct)


def test_weight_dtype_is_validated_and_tools_set_it_like_launch():
  config = apply_assignments(default_config(), ["inference.weight_dtype=int8", "serve.slots=4", "model.learn_gamma=false"])
  assert (config.inference.weight_dtype, config.serve.slots, config.model.learn_gamma) == ("int8", 4, False)
  with pytest.raises(ConfigError, match="inference.weight_dtype"):
    validate(apply_assignments(default_config(), ["inference.weight_dtype=int4"]))
  with pytest.raises(ConfigError, match="inference.weight_dtipe"):
    apply_assignments(default_config(), ["inference.weight_dtipe=int8"])
  with pytest.raises(ConfigError, match="serve.slots"):
    apply_assignments(default_config(), ["serve.slots=many"])
  with pytest.raises(ConfigError, match="serve.slots"):
    validate(apply_assignments(default_config(), ["serve.slots=0"]))
