"""Blockwise and Pallas kernels against the references: values, gradients, causality, memory shape."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neon_qtg_jax.model import attention as attention_kinds
from neon_qtg_jax.ops import blockwise_geo, blockwise_topo, dispatch, geo_attention, measure, pallas_geo, topo_filter

GAMMA = jnp.array([1.0, 8.0, 30.0])  # the seed's value, the config default, a sharp head


def attention_inputs(length, batch=2, heads=3, head_dim=8, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (batch, length, heads, head_dim)
  q, k, v = (2.0 * jax.random.normal(key, shape) for key in keys[:3])
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), jax.random.normal(keys[3], shape)


def value_and_grads(attn, *args):
  return jax.jit(measure.loss_and_grads(attn, len(args) - 1))(*args)


@pytest.mark.parametrize("length,block_q,block_k", [(37, 16, 8), (64, 16, 32), (5, 128, 128)])
def test_geo_blockwise_matches_reference(length, block_q, block_k):
  q, k, v, cot = attention_inputs(length)
  fast = functools.partial(blockwise_geo.geo_attention_blockwise, block_q=block_q, block_k=block_k)
  np.testing.assert_allclose(jax.jit(fast)(q, k, v, GAMMA), geo_attention.geo_attention_reference(q, k, v, GAMMA),
                             atol=2e-5, rtol=1e-5)
  got = value_and_grads(fast, q, k, v, GAMMA, cot)
  want = value_and_grads(geo_attention.geo_attention_reference, q, k, v, GAMMA, cot)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))), rtol=1e-4)


@pytest.mark.parametrize("length,block_q,block_k", [(37, 16, 8), (48, 16, 16)])
def test_dot_blockwise_matches_reference(length, block_q, block_k):
  q, k, v, cot = attention_inputs(length)
  fast = functools.partial(blockwise_geo.dot_attention_blockwise, block_q=block_q, block_k=block_k)
  got = value_and_grads(fast, q, k, v, cot)
  want = value_and_grads(geo_attention.dot_attention_reference, q, k, v, cot)
  assert measure.max_relative_error(got, want) < 1e-5


def test_geo_blockwise_bf16_is_as_accurate_as_the_bf16_reference():
  q, k, v, cot = attention_inputs(100, head_dim=16, dtype=jnp.bfloat16)
  exact = value_and_grads(geo_attention.geo_attention_reference,
                          *(x.astype(jnp.float32) for x in (q, k, v)), GAMMA, cot)
  reference = value_and_grads(geo_attention.geo_attention_reference, q, k, v, GAMMA, cot)
  fast = value_and_grads(functools.partial(blockwise_geo.geo_attention_blockwise, block_q=32, block_k=16),
                         q, k, v, GAMMA, cot)
  assert measure.max_relative_error(fast[1], reference[1]) < 3e-2
  # Rounding the sphere points to bf16 is the dominant error; blockwise adds little to it.
  assert measure.max_relative_error(fast[1], exact[1]) <= 1.25 * measure.max_relative_error(reference[1], exact[1])
  out = jax.jit(functools.partial(blockwise_geo.geo_attention_blockwise, block_q=32, block_k=16))(q, k, v, GAMMA)
  assert out.dtype == jnp.bfloat16
  assert measure.max_relative_error(out, geo_attention.geo_attention_reference(q, k, v, GAMMA)) < 1e-2


def test_geo_blockwise_finite_where_bc_is_one():
  q, _, v, cot = attention_inputs(40)
  grads = value_and_grads(functools.partial(blockwise_geo.geo_attention_blockwise, block_q=16, block_k=16),
                          q, q, v, GAMMA, cot)[1]  # keys equal queries: BC_ii = 1 up to rounding
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize("attn", [
    functools.partial(blockwise_geo.geo_attention_blockwise, gamma=GAMMA, block_q=16, block_k=8),
    functools.partial(blockwise_geo.dot_attention_blockwise, block_q=16, block_k=8)], ids=["geo", "dot"])
def test_blockwise_attention_is_causal(attn):
  q, k, v, _ = attention_inputs(45)
  cut = 21
  changed = [x.at[:, cut:].set(jax.random.normal(jax.random.PRNGKey(9), x[:, cut:].shape)) for x in (q, k, v)]
  before, after = jax.jit(attn)(q, k, v), jax.jit(attn)(*changed)
  np.testing.assert_array_equal(before[:, :cut], after[:, :cut])
  assert not np.allclose(before[:, cut:], after[:, cut:])


def _max_square_dims(fn, *args, length):
  """Largest count of axes of size `length` on any array in fn's jaxpr (sub-jaxprs included)."""
  most = 0
  def visit(jaxpr):
    nonlocal most
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        most = max(most, sum(d == length for d in getattr(var.aval, "shape", ())))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return most


def test_blockwise_never_builds_an_l_by_l_array():
  length = 96  # distinct from every other dimension below
  q, k, v, cot = attention_inputs(length)
  psi = jax.random.normal(jax.random.PRNGKey(1), (2, length, 12))
  geo_fast = measure.loss_and_grads(
      functools.partial(blockwise_geo.geo_attention_blockwise, block_q=32, block_k=16), 4)
  geo_ref = measure.loss_and_grads(geo_attention.geo_attention_reference, 4)
  topo_fast = jax.grad(lambda p: jnp.sum(blockwise_topo.topo_persistence_blockwise(p, k=3, block_q=32, block_k=16)))
  assert _max_square_dims(geo_ref, q, k, v, GAMMA, cot, length=length) == 2  # the check sees (L, L)
  assert _max_square_dims(geo_fast, q, k, v, GAMMA, cot, length=length) == 1
  assert _max_square_dims(topo_fast, psi, length=length) == 1


@pytest.mark.parametrize("length,k,block_q,block_k", [(37, 1, 16, 8), (50, 3, 16, 32), (20, 4, 128, 128)])
def test_topo_blockwise_matches_reference(length, k, block_q, block_k):
  psi = jax.random.normal(jax.random.PRNGKey(length), (2, length, 12))
  cot = jax.random.normal(jax.random.PRNGKey(1), (2, length))
  fast = functools.partial(blockwise_topo.topo_persistence_blockwise, k=k, block_q=block_q, block_k=block_k)
  ref = functools.partial(topo_filter.topo_persistence_reference, k=k)
  np.testing.assert_allclose(jax.jit(fast)(psi), jax.jit(ref)(psi), atol=1e-6)
  got = jax.jit(jax.grad(lambda p: jnp.sum(fast(p) * cot)))(psi)
  want = jax.jit(jax.grad(lambda p: jnp.sum(ref(p) * cot)))(psi)
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_topo_nearest_earlier_finds_the_brute_force_neighbours():
  phi = topo_filter.unit_states(jax.random.normal(jax.random.PRNGKey(3), (1, 30, 6)), 1e-6)
  idx, found = jax.jit(functools.partial(blockwise_topo.nearest_earlier, k=2, block_q=8, block_k=16))(phi)
  dist = np.asarray(2 - 2 * phi[0] @ phi[0].T)
  for t in range(30):
    assert found[0, t].sum() == min(t, 2)
    if t >= 2:
      assert sorted(np.asarray(idx[0, t]).tolist()) == sorted(np.argsort(dist[t, :t])[:2].tolist())


@pytest.mark.parametrize("length,block_q,block_k", [(40, 16, 32), (32, 32, 16)])
def test_pallas_geo_interpret_matches_reference(length, block_q, block_k):
  q, k, v, cot = attention_inputs(length, batch=1, heads=2, head_dim=16)
  gamma = GAMMA[1:]
  fast = functools.partial(pallas_geo.geo_attention_pallas, block_q=block_q, block_k=block_k, backward_block=16,
                           interpret=True)
  got = value_and_grads(fast, q, k, v, gamma, cot)
  want = value_and_grads(geo_attention.geo_attention_reference, q, k, v, gamma, cot)
  assert measure.max_relative_error(got, want) < 5e-5  # dgamma sums B L^2 float32 terms in another order


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_geo_lowers_to_triton_for_gpu(dtype):
  """Cross-lowering for CUDA on this host: every primitive and block shape of the three kernels
  has a Triton lowering (PTX compilation and execution need a GPU: tools/device_check.py)."""
  q = jax.ShapeDtypeStruct((1, 300, 2, 64), dtype)  # ragged: padded to 320, not a power of two
  cot = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  gamma = jax.ShapeDtypeStruct((2,), jnp.float32)
  fwd_bwd = measure.loss_and_grads(functools.partial(pallas_geo.geo_attention_pallas, block_q=64, block_k=32), 4)
  text = jax.jit(fwd_bwd).trace(q, q, q, gamma, cot).lower(lowering_platforms=("cuda",)).as_text()
  kernels = re.findall(r'__gpu\$xla\.gpu\.triton.*?name = "(geo_attention_\w+)"', text)
  assert sorted(kernels) == ["geo_attention_dkv", "geo_attention_dq", "geo_attention_forward"]


def test_pallas_geo_rejects_unusable_blocks_naming_the_field():
  q, k, v, _ = attention_inputs(32, head_dim=16)
  with pytest.raises(ValueError, match="model.block_k"):
    pallas_geo.geo_attention_pallas(q, k, v, GAMMA, block_q=32, block_k=24, interpret=True)
  q8, k8, v8, _ = attention_inputs(32, head_dim=8)
  with pytest.raises(ValueError, match="head_dim=8"):
    pallas_geo.geo_attention_pallas(q8, k8, v8, GAMMA, interpret=True)


def test_dispatch_resolves_and_routes():
  assert dispatch.resolve_impl("auto", 1024, 1024) == "blockwise"
  assert dispatch.resolve_impl("auto", 1023, 1024) == "reference"
  assert dispatch.resolve_impl("pallas", 8, 1024) == "pallas"
  q, k, v, _ = attention_inputs(24)
  ref = geo_attention.geo_attention_reference(q, k, v, GAMMA)
  geo = attention_kinds.get("geo")
  for impl in ("blockwise", "pallas"):  # pallas falls back to blockwise off GPU
    attn = jax.jit(functools.partial(geo.attend, impl=impl, block_q=8, block_k=8))
    np.testing.assert_allclose(attn(q, k, v, GAMMA), ref, atol=2e-5)
  with pytest.raises(ValueError, match="attention_impl='fused'"):
    geo.attend(q, k, v, GAMMA, impl="fused", block_q=8, block_k=8)
  psi = jax.random.normal(jax.random.PRNGKey(0), (2, 24, 6))
  topo = jax.jit(functools.partial(dispatch.topo_persistence, k=1, eps=1e-6, impl="blockwise", block_q=8, block_k=8))
  np.testing.assert_allclose(topo(psi), topo_filter.topo_persistence_reference(psi), atol=1e-6)
