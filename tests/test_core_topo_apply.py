"""model.topo_apply: where the TopoFilter's weights w_t act (issue 27, item 5).

Under the default `geo` attention with the `normed` sphere map, "inputs" (f = w psi only) lets the
normalisation divide w out of q and k, so the attention pattern barely depends on the filter;
"after_norm" applies w again after the normalisation, so it does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neon_qtg_jax.config import ConfigError, complete_saved_config, default_config, validate
from neon_qtg_jax.model import QTGModel


def config(**overrides):
  m = default_config().model
  # init_std 0.2: spread-out TopoFilter distances, so w varies between tokens
  m.update(dict(vocab_size=97, embed_dim=16, num_layers=2, num_heads=2, max_seq_len=48, init_std=0.2))
  m.update(overrides)
  return m


def tokens(seed=1, shape=(2, 24)):
  return jax.random.randint(jax.random.key(seed), shape, 0, 97, dtype=jnp.int32)


def first_layer_probs(**overrides) -> np.ndarray:
  return np.asarray(QTGModel(config(**overrides), rngs=nnx.Rngs(0)).recorded(tokens())["attention"][0])


@pytest.mark.parametrize("attention", ["geo", "cosine"])
def test_under_after_norm_the_default_attention_pattern_depends_on_the_filter(attention):
  # The same parameters and inputs; only the filter's weights change (threshold 0.1 -> 0, or no filter: w = 1).
  changes = {}
  for apply in ("inputs", "after_norm"):
    base = first_layer_probs(attention=attention, topo_apply=apply)
    w = QTGModel(config(attention=attention, topo_apply=apply), rngs=nnx.Rngs(0)).recorded(tokens())["w"][0]
    assert float(jnp.min(w)) < 0.9  # the filter does act on these states
    changes[apply] = [np.abs(first_layer_probs(attention=attention, topo_apply=apply, **o) - base).max()
                      for o in ({"persistence_threshold": 0.0}, {"topofilter": False})]
  assert max(changes["inputs"]) < 1e-3        # rms(q) divides w out: only eps and rounding remain
  assert min(changes["after_norm"]) > 1e-2    # the filter now changes what attention selects


def test_under_inputs_the_logits_are_the_old_forward_pass_bit_for_bit():
  # The forward pass as it was before model.topo_apply existed, written out from the model's parts.
  model = QTGModel(config(topo_apply="inputs"), rngs=nnx.Rngs(0))
  x = tokens()
  graphdef, state = nnx.split(model.blocks)
  h = model.embed(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape))
  for i in range(model.cfg.num_layers):
    block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
    f, _ = block.filtered_states(h)
    out, _ = block.attn(f)  # no w: the attention sees f = w psi only
    h = block.mlp_residual(h + block.w_o(out.reshape(*x.shape, -1)).astype(jnp.float32), None)
  np.testing.assert_array_equal(model(x), model.logits(h))


def test_old_checkpoints_keep_inputs_and_unknown_values_are_refused():
  saved = default_config()
  del saved.model["topo_apply"]
  assert complete_saved_config(saved).model.topo_apply == "inputs"
  assert default_config().model.topo_apply == "inputs"
  bad = default_config()
  bad.model.topo_apply = "scores"
  with pytest.raises(ConfigError, match="model.topo_apply"):
    validate(bad)


@pytest.mark.parametrize("overrides", [{"sphere_map": "seed"}, {"sphere_map": "scaled"},
                                       {"attention": "dot"}, {"topofilter": False}],
                         ids=["seed_map", "scaled_map", "dot", "no_filter"])
def test_where_nothing_divides_w_out_after_norm_changes_nothing(overrides):
  # seed and scaled maps and dot are linear in q, k: w already reaches the score through f.
  x = tokens()
  old = QTGModel(config(topo_apply="inputs", **overrides), rngs=nnx.Rngs(0))(x)
  new = QTGModel(config(topo_apply="after_norm", **overrides), rngs=nnx.Rngs(0))(x)
  np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("attention", ["geo", "cosine"])
def test_after_norm_blockwise_matches_the_reference_in_values_and_gradients(attention):
  x = tokens(11, (2, 30))
  ref = QTGModel(config(attention=attention, topo_apply="after_norm", attention_impl="reference"), rngs=nnx.Rngs(3))
  fast = QTGModel(config(attention=attention, topo_apply="after_norm", attention_impl="blockwise", block_q=8,
                         block_k=16), rngs=nnx.Rngs(3))
  np.testing.assert_allclose(fast(x), ref(x), atol=2e-5, rtol=1e-5)

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(x))[..., 0])

  g_ref, g_fast = nnx.grad(loss)(ref), nnx.grad(loss)(fast)
  for a, b in zip(jax.tree.leaves(nnx.state(g_ref)), jax.tree.leaves(nnx.state(g_fast))):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-3)
