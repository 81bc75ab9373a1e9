"""Sampling: top-k/top-p keep exactly the right tokens, sampling follows the filtered distribution, seeds reproduce."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neon_qtg_jax.config import default_config
from neon_qtg_jax.inference.sampling import SamplingParams, filter_logits, continue_prompts, top_k_mask, top_p_mask
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.model import QTGModel

SHARDING = ShardingConfig.from_config(default_config().parallel)  # the default mesh: every device on fsdp


def reference_top_k(logits: np.ndarray, k: int) -> np.ndarray:
  keep = np.zeros(logits.shape, bool)
  for row, values in enumerate(logits):
    keep[row, np.argsort(-values, kind="stable")[:k]] = True
  return keep


def reference_top_p(logits: np.ndarray, p: float) -> np.ndarray:
  keep = np.zeros(logits.shape, bool)
  for row, values in enumerate(logits.astype(np.float64)):
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    mass = 0.0
    for idx in np.argsort(-values, kind="stable"):
      keep[row, idx] = True
      mass += probs[idx]
      if mass >= p:
        break
  return keep


@pytest.mark.parametrize("k", [1, 5, 17, 0, 40])
def test_top_k_keeps_exactly_the_k_largest(k):
  logits = np.asarray(jax.random.normal(jax.random.key(k), (6, 40)))
  expected = reference_top_k(logits, k) if 0 < k < 40 else np.ones_like(logits, bool)
  np.testing.assert_array_equal(top_k_mask(jnp.asarray(logits), k), expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
  # Scaled logits make a peaked distribution, so sets of every size occur across rows and p.
  logits = 3.0 * np.asarray(jax.random.normal(jax.random.key(1), (8, 30)))
  np.testing.assert_array_equal(top_p_mask(jnp.asarray(logits), p), reference_top_p(logits, p))


def test_top_p_on_a_known_distribution():
  probs = np.array([[0.5, 0.3, 0.15, 0.05]])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  np.testing.assert_array_equal(top_p_mask(logits, 0.5), [[True, False, False, False]])
  np.testing.assert_array_equal(top_p_mask(logits, 0.79), [[True, True, False, False]])
  np.testing.assert_array_equal(top_p_mask(logits, 0.81), [[True, True, True, False]])
  np.testing.assert_array_equal(top_p_mask(logits, 1.0), [[True, True, True, True]])


def test_filter_applies_top_p_after_top_k_and_temperature():
  logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]], jnp.float32))
  filtered = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5))
  # Top-2 renormalised is (4/7, 3/7): p=0.5 keeps the first only.
  np.testing.assert_array_equal(jnp.isfinite(filtered), [[True, False, False, False]])
  hot = filter_logits(logits, SamplingParams(temperature=2.0, top_k=0, top_p=1.0))
  np.testing.assert_allclose(hot, logits / 2.0, rtol=1e-6)


def tiny_model() -> QTGModel:
  m = default_config().model
  m.update(dict(vocab_size=31, embed_dim=16, num_layers=1, num_heads=2, max_seq_len=32, init_std=0.5))
  return QTGModel(m, rngs=nnx.Rngs(0))


def test_sampling_is_reproducible_under_a_seed():
  model = tiny_model()
  cfg = default_config().sampling
  cfg.update(dict(temperature=1.5, top_k=0, top_p=1.0))
  prompts = [[1, 2, 3], [4, 5]]
  first = continue_prompts(model, prompts, sampling_cfg=cfg, max_new_tokens=16, eos_id=None, seed=7, sharding=SHARDING)
  again = continue_prompts(model, prompts, sampling_cfg=cfg, max_new_tokens=16, eos_id=None, seed=7, sharding=SHARDING)
  other = continue_prompts(model, prompts, sampling_cfg=cfg, max_new_tokens=16, eos_id=None, seed=8, sharding=SHARDING)
  assert first == again
  assert first != other
  assert all(len(row) == 16 for row in first)


def test_sampled_tokens_stay_inside_the_filtered_set():
  model = tiny_model()
  prompt = [[3, 4, 5]]
  logits = np.asarray(model(jnp.asarray(prompt))[0, -1])
  cfg = SamplingParams(temperature=1.0, top_k=3, top_p=1.0)
  allowed = set(np.argsort(-logits)[:3].tolist())
  firsts = {continue_prompts(model, prompt, sampling_cfg=cfg, max_new_tokens=1, eos_id=None, seed=s,
                             sharding=SHARDING)[0][0] for s in range(12)}
  assert firsts <= allowed and len(firsts) > 1


def test_valid_vocab_keeps_ids_the_tokenizer_can_decode():
  cfg = SamplingParams(temperature=2.0, top_k=0, top_p=1.0)
  out = continue_prompts(tiny_model(), [[1, 2], [3]], sampling_cfg=cfg, max_new_tokens=20, eos_id=None, seed=0,
                         valid_vocab=5, sharding=SHARDING)
  assert all(0 <= t < 5 for row in out for t in row)
