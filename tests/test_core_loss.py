"""Each loss term against a hand computation."""

import jax.numpy as jnp
import numpy as np

from neon_qtg_jax.loss import LossWeights, qtg_loss


def test_loss_terms_match_hand_computation():
  rng = np.random.default_rng(0)
  b, length, vocab, width, layers = 2, 4, 5, 6, 3
  logits = rng.normal(size=(b, length, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, size=(b, length))
  s = rng.uniform(0, 2, size=(layers, b, length)).astype(np.float32)
  residual = rng.normal(size=(b, length, width)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  weights = LossWeights(topo=0.1, geo=0.05, quantum=0.01)

  terms = qtg_loss(jnp.asarray(logits), jnp.asarray(targets), {"s": jnp.asarray(s), "residual": jnp.asarray(residual)},
                   weights, jnp.asarray(mask))

  x = logits.astype(np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p_target = np.take_along_axis(p, targets[..., None], -1)[..., 0]
  ce = -np.log(p_target)[mask].mean()
  geo = (np.arccos(np.sqrt(p_target)) ** 2)[mask].mean()
  topo_mask = mask.copy()
  topo_mask[:, 0] = False
  topo = ((1 - s) ** 2).mean(0)[topo_mask].mean()
  quantum = ((1 - (residual.astype(np.float64) ** 2).sum(-1) / width) ** 2)[mask].mean()

  np.testing.assert_allclose(terms["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(terms["geo"], geo, rtol=1e-5)
  np.testing.assert_allclose(terms["topo"], topo, rtol=1e-5)
  np.testing.assert_allclose(terms["quantum"], quantum, rtol=1e-5)
  np.testing.assert_allclose(terms["loss"], ce + 0.1 * topo + 0.05 * geo + 0.01 * quantum, rtol=1e-5)
  np.testing.assert_allclose(terms["perplexity"], np.exp(ce), rtol=1e-5)


def test_uniform_logits_give_vocab_perplexity():
  vocab = 50
  terms = qtg_loss(jnp.zeros((1, 3, vocab)), jnp.array([[1, 2, 3]]),
                   {"s": jnp.ones((1, 1, 3)), "residual": jnp.ones((1, 3, 4))}, LossWeights())
  np.testing.assert_allclose(terms["perplexity"], vocab, rtol=1e-5)
  assert terms["topo"] == 0.0 and terms["quantum"] == 0.0
