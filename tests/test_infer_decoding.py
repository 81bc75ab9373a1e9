"""Cached decoding: the same logits as the full forward pass at every step, padding that does not leak."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neon_qtg_jax.config import default_config
from neon_qtg_jax.inference import decoding
from neon_qtg_jax.inference.recompute import generate_recompute
from neon_qtg_jax.inference.sampling import SamplingParams, continue_prompts
from neon_qtg_jax.model import QTGModel
from neon_qtg_jax.parallel import ShardingConfig

SHARDING = ShardingConfig.from_config(default_config().parallel)  # the default mesh: every device on fsdp

VOCAB = 61


def tiny_model(**overrides) -> QTGModel:
  m = default_config().model
  # init_std 0.2 gives logits of order 1 and spread-out TopoFilter distances, so errors show.
  m.update(dict(vocab_size=VOCAB, embed_dim=16, num_layers=2, num_heads=2, max_seq_len=48, init_std=0.2))
  m.update(overrides)
  return QTGModel(m, rngs=nnx.Rngs(0))


forward_cached = nnx.jit(decoding.forward_cached, static_argnames=("last_only",))


@pytest.mark.parametrize("overrides, tol", [
    ({}, 2e-5),
    ({"topo_k": 2}, 2e-5),
    ({"attention": "dot", "topofilter": False}, 2e-5),
    ({"attention": "dot", "topofilter": False, "w_psi": False, "amplitude_embedding": False}, 2e-5),
    ({"sphere_map": "seed", "w_psi_init": "normal"}, 2e-5),
    ({"attention": "dot", "topofilter": False, "w_psi": False, "amplitude_embedding": False,
      "attention_width": "residual", "mlp_ratio": 8, "tie_embeddings": True}, 2e-5),
    ({"attention": "cosine"}, 2e-5),
    ({"attention": "cosine", "sphere_map": "seed"}, 2e-5),
    ({"topo_apply": "after_norm"}, 2e-5),
    ({"attention": "cosine", "topo_apply": "after_norm"}, 2e-5),
], ids=["qtg", "qtg_topo_k2", "gpt_spec", "gpt_spec_no_psi", "qtg_seed_form", "gpt_standard_shape", "cosine",
        "cosine_seed_form", "qtg_topo_after_norm", "cosine_topo_after_norm"])
def test_cached_logits_match_full_forward_at_every_step(overrides, tol):
  model = tiny_model(**overrides)
  rng = np.random.default_rng(0)
  total = 14
  rows = rng.integers(0, VOCAB, (2, total))
  prompt_lens = [6, 3]  # different lengths: row 1 is left-padded by 3 slots
  slots = max(prompt_lens)
  full = [np.asarray(model(jnp.asarray(row[None]))[0]) for row in rows]

  tokens, positions, valid = decoding.left_pad([list(r[:n]) for r, n in zip(rows, prompt_lens)], slots)
  cache = decoding.init_cache(model, 2, slots + total)
  logits, cache = forward_cached(model, cache, tokens, positions, 0, valid)
  for b, n in enumerate(prompt_lens):
    np.testing.assert_allclose(logits[b, slots - n:], full[b][:n], atol=tol, rtol=tol / 2)

  for step in range(total - max(prompt_lens)):
    token = jnp.asarray([[rows[b, n + step]] for b, n in enumerate(prompt_lens)], jnp.int32)
    pos = jnp.asarray([[n + step] for n in prompt_lens], jnp.int32)
    logits, cache = forward_cached(model, cache, token, pos, slots + step, jnp.ones((2, 1), bool))
    for b, n in enumerate(prompt_lens):
      np.testing.assert_allclose(logits[b, 0], full[b][n + step], atol=tol, rtol=tol / 2,
                                 err_msg=f"row {b}, decode step {step}")


@pytest.mark.parametrize("overrides", [{}, {"sphere_map": "seed", "w_psi_init": "normal"}], ids=["qtg", "qtg_seed_form"])
def test_bf16_cached_decoding_is_as_close_to_float32_as_the_bf16_forward(overrides):
  # In bf16 the cached and the full pass round differently (about 0.05 on logits of order 1 here), so
  # each is compared with the float32 model of the same parameters: the cache adds no error of its own.
  model, reference = tiny_model(dtype="bfloat16", **overrides), tiny_model(**overrides)
  rng = np.random.default_rng(0)
  total, prompt_lens = 14, [6, 3]
  rows = rng.integers(0, VOCAB, (2, total))
  full = [np.asarray(model(jnp.asarray(row[None]))[0]) for row in rows]
  exact = [np.asarray(reference(jnp.asarray(row[None]))[0]) for row in rows]
  slots = max(prompt_lens)
  tokens, positions, valid = decoding.left_pad([list(r[:n]) for r, n in zip(rows, prompt_lens)], slots)
  cache = decoding.init_cache(model, 2, slots + total)
  _, cache = forward_cached(model, cache, tokens, positions, 0, valid)
  cached_error, full_error = [], []
  for step in range(total - slots):
    token = jnp.asarray([[rows[b, n + step]] for b, n in enumerate(prompt_lens)], jnp.int32)
    pos = jnp.asarray([[n + step] for n in prompt_lens], jnp.int32)
    logits, cache = forward_cached(model, cache, token, pos, slots + step, jnp.ones((2, 1), bool))
    for b, n in enumerate(prompt_lens):
      cached_error.append(np.abs(np.asarray(logits[b, 0]) - exact[b][n + step]).max())
      full_error.append(np.abs(full[b][n + step] - exact[b][n + step]).max())
  assert 0 < max(full_error) < 0.1
  assert max(cached_error) <= 1.25 * max(full_error) + 0.01, (max(cached_error), max(full_error))


def test_cache_holds_transformed_keys_and_unit_states():
  model = tiny_model()
  tokens, positions, valid = decoding.left_pad([[1, 2, 3]], 3)
  _, cache = forward_cached(model, decoding.init_cache(model, 1, 5), tokens, positions, 0, valid)
  keys = np.asarray(cache.keys[:, 0, :3])
  np.testing.assert_allclose(np.sum(keys * keys, axis=-1), 1.0, rtol=1e-5)  # points of the sqrt-probability sphere
  np.testing.assert_allclose(np.linalg.norm(np.asarray(cache.phi[:, 0, :3]), axis=-1), 1.0, rtol=1e-5)
  assert cache.phi.shape == (2, 1, 5, 32)
  np.testing.assert_array_equal(cache.valid, [[True, True, True, False, False]])


def test_greedy_generation_matches_full_recomputation():
  model = tiny_model()
  prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]
  greedy = SamplingParams(temperature=0.0)
  cached = continue_prompts(model, prompts, sampling_cfg=greedy, max_new_tokens=12, eos_id=None, seed=0,
                            sharding=SHARDING)
  recomputed = generate_recompute(model, prompts, params=greedy, max_new_tokens=12, seed=0)
  assert cached == recomputed


def test_padding_does_not_change_a_prompts_continuation():
  model = tiny_model()
  greedy = SamplingParams(temperature=0.0)
  alone = continue_prompts(model, [[7, 8, 9]], sampling_cfg=greedy, max_new_tokens=10, eos_id=None, seed=0,
                           sharding=SHARDING)
  batched = continue_prompts(model, [[7, 8, 9], list(range(20, 40))], sampling_cfg=greedy, max_new_tokens=10,
                             eos_id=None, seed=0, sharding=SHARDING)
  assert batched[0] == alone[0]


def test_stops_at_eos_and_cuts_it():
  model = tiny_model()
  greedy = SamplingParams(temperature=0.0)
  free = continue_prompts(model, [[5, 6, 7]], sampling_cfg=greedy, max_new_tokens=12, eos_id=None, seed=0,
                          sharding=SHARDING)[0]
  eos = free[4]
  stopped = continue_prompts(model, [[5, 6, 7]], sampling_cfg=greedy, max_new_tokens=12, eos_id=eos, seed=0,
                             sharding=SHARDING)[0]
  assert stopped == free[:free.index(eos)]


@pytest.mark.parametrize("prompts, max_new, message", [
    ([[1, 2], []], 4, "prompt 1 is empty"),
    ([[1] * 40], 10, "exceeds model.max_seq_len=48"),
    ([[1, VOCAB]], 4, "outside"),
])
def test_bad_prompts_are_named(prompts, max_new, message):
  with pytest.raises(ValueError, match=message):
    continue_prompts(tiny_model(), prompts, sampling_cfg=SamplingParams(), max_new_tokens=max_new, eos_id=None, seed=0,
                     sharding=SHARDING)
