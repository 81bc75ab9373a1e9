"""The whole model with the blockwise kernels equals the model with the references (logits and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.model.qtg import QTGModel


def tiny_config(attention: str, impl: str):
  c = default_config()
  m = c.model
  m.vocab_size, m.embed_dim, m.num_layers, m.num_heads, m.max_seq_len = 64, 32, 2, 2, 48
  m.attention, m.attention_impl, m.block_q, m.block_k, m.topo_k = attention, impl, 16, 8, 2
  c.data.max_length, c.data.stride, c.eval.max_length, c.eval.stride = 40, 20, 40, 20
  return validate(c)


def logits_and_grads(config, tokens):
  model = QTGModel(config.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss(params):
    logits, aux = nnx.merge(graphdef, params)(tokens, return_aux=True)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + jnp.mean(aux["s"]), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


@pytest.mark.parametrize("attention", ["geo", pytest.param("dot", marks=pytest.mark.slow)])
def test_blockwise_model_matches_reference_model(attention):
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 37), 0, 64)  # ragged: not a multiple of the blocks
  ref_logits, ref_grads = logits_and_grads(tiny_config(attention, "reference"), tokens)
  fast_logits, fast_grads = logits_and_grads(tiny_config(attention, "blockwise"), tokens)
  np.testing.assert_allclose(fast_logits, ref_logits, atol=1e-4, rtol=1e-4)
  for fast, ref in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(fast, ref, atol=1e-5 + 1e-4 * float(jnp.max(jnp.abs(ref))), rtol=1e-3)
