"""Sliding-window perplexity: each token scored once with the longest context; a uniform model scores V."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neon_qtg_jax.config import default_config
from neon_qtg_jax.evaluation.perplexity import model_log_prob_fn, score_stream, summary, window_plan
from neon_qtg_jax.model import QTGModel


@pytest.mark.parametrize("num_tokens, max_length, stride", [
    (100, 16, 8), (100, 16, 16), (100, 16, 5), (17, 16, 8), (18, 16, 8), (5, 16, 8), (2, 4, 1), (1000, 64, 48),
])
def test_window_plan_scores_every_target_once_with_the_longest_context(num_tokens, max_length, stride):
  times_scored = np.zeros(num_tokens, int)
  for w in window_plan(num_tokens, max_length, stride):
    assert 0 < w.length <= max_length and w.begin + w.length <= num_tokens - 1
    for offset in range(w.first_scored, w.length):
      target = w.begin + 1 + offset
      times_scored[target] += 1
      context = offset + 1
      assert context >= min(target, max_length - stride + 1), (target, context)
  assert times_scored[0] == 0 and np.all(times_scored[1:] == 1)


def test_score_stream_counts_each_token_once():
  tokens = np.arange(203) % 50
  seen = []

  def fake_log_probs(inputs, targets):
    seen.append(inputs.shape)
    return -np.ones(targets.shape, np.float32)  # every scored target costs exactly 1 nat

  score = score_stream(fake_log_probs, tokens, max_length=32, stride=12, batch_size=3, progress=False)
  assert score.tokens == 202 and score.nll == pytest.approx(202.0)
  assert score.loss_counts.sum() == 202
  assert set(seen) == {(3, 32)}  # one compiled shape: short windows and the last batch are padded


def test_uniform_model_has_perplexity_equal_to_the_vocab_size():
  m = default_config().model
  m.update(dict(vocab_size=37, embed_dim=16, num_layers=1, num_heads=2, max_seq_len=16))
  model = QTGModel(m, rngs=nnx.Rngs(0))
  model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])  # logits 0 everywhere: uniform output
  tokens = np.random.default_rng(0).integers(0, 37, 150)
  score = score_stream(model_log_prob_fn(model), tokens, max_length=16, stride=8, batch_size=4, progress=False)
  result = summary(score, text_bytes=300)
  assert result["tokens"] == 149
  assert result["perplexity"] == pytest.approx(37.0, rel=1e-5)
  assert result["bits_per_byte"] == pytest.approx(149 * math.log2(37) / 300, rel=1e-5)
