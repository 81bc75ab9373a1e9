"""Reference ops against brute-force NumPy computations of the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neon_qtg_jax.ops import arccos_sq, dot_attention_reference, geo_attention_reference, topo_persistence_reference


@pytest.mark.parametrize("x", [0.0, 0.5, 1.0 - 1e-7, 1.0])
def test_arccos_sq_value_and_gradient(x):
  x32 = np.float32(x)
  value, grad = jax.value_and_grad(arccos_sq)(jnp.float32(x32))
  exact = np.arccos(np.float64(x32)) ** 2
  t = 1.0 - np.float64(x32)
  exact_grad = -2.0 if t == 0 else -2.0 * np.arccos(np.float64(x32)) / np.sqrt(t * (2.0 - t))
  assert np.isfinite(value) and np.isfinite(grad)
  np.testing.assert_allclose(value, exact, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(grad, exact_grad, rtol=1e-6)
  if x == 1.0:
    assert grad == -2.0


def test_arccos_sq_finite_and_accurate_on_unit_interval():
  xs = np.concatenate([np.linspace(0, 1, 1001), 1 - np.logspace(-8, -1, 50)]).astype(np.float32)
  values = jax.vmap(arccos_sq)(xs)
  grads = jax.vmap(jax.grad(arccos_sq))(xs)
  assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
  x64 = xs.astype(np.float64)
  np.testing.assert_allclose(values, np.arccos(x64) ** 2, atol=2e-7, rtol=1e-5)
  interior = x64 < 1
  expected = -2 * np.arccos(x64[interior]) / np.sqrt((1 - x64[interior]) * (1 + x64[interior]))
  np.testing.assert_allclose(grads[interior], expected, rtol=2e-5)
  # Above 1 (rounding of BC) the value is clipped and the derivative is 0.
  assert arccos_sq(jnp.float32(1.01)) == 0.0 and jax.grad(arccos_sq)(jnp.float32(1.01)) == 0.0


def brute_force_persistence(psi: np.ndarray, k: int) -> np.ndarray:
  b, length, _ = psi.shape
  phi = psi / np.linalg.norm(psi, axis=-1, keepdims=True)
  s = np.zeros((b, length))
  for bi in range(b):
    for t in range(1, length):
      dists = sorted(np.linalg.norm(phi[bi, t] - phi[bi, j]) for j in range(t))
      s[bi, t] = np.mean(dists[:k])
  return s


@pytest.mark.parametrize("k", [1, 3])
def test_topo_persistence_matches_brute_force(k):
  psi = np.random.default_rng(0).normal(size=(2, 13, 10)).astype(np.float32)
  s = topo_persistence_reference(jnp.asarray(psi), k=k, eps=1e-6)
  np.testing.assert_allclose(s, brute_force_persistence(psi.astype(np.float64), k), atol=2e-5)
  assert s[:, 0].tolist() == [0.0, 0.0]


def test_topo_persistence_works_per_sequence():
  psi = np.random.default_rng(1).normal(size=(3, 9, 8)).astype(np.float32)
  together = topo_persistence_reference(jnp.asarray(psi), k=1, eps=1e-6)
  alone = topo_persistence_reference(jnp.asarray(psi[1:2]), k=1, eps=1e-6)
  np.testing.assert_array_equal(together[1:2], alone)


def test_topo_persistence_gradient_finite_on_repeated_states():
  psi = jnp.tile(jnp.arange(1.0, 7.0), (1, 5, 1))  # identical states: every distance is 0
  grad = jax.grad(lambda p: topo_persistence_reference(p, k=1, eps=1e-6).sum())(psi)
  assert np.all(np.isfinite(grad))


def brute_force_geo_attention(q, k, v, gamma):
  b, length, h, _ = q.shape
  def sphere(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return np.sqrt(e / e.sum(-1, keepdims=True))
  qs, ks = sphere(q), sphere(k)
  out = np.zeros_like(v)
  for bi in range(b):
    for hi in range(h):
      for i in range(length):
        scores = np.array([-gamma[hi] * np.arccos(min(qs[bi, i, hi] @ ks[bi, j, hi], 1.0)) ** 2 for j in range(i + 1)])
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[bi, i, hi] = weights @ v[bi, : i + 1, hi]
  return out


def brute_force_dot_attention(q, k, v):
  b, length, h, hd = q.shape
  out = np.zeros_like(v)
  for bi in range(b):
    for hi in range(h):
      for i in range(length):
        scores = np.array([q[bi, i, hi] @ k[bi, j, hi] / np.sqrt(hd) for j in range(i + 1)])
        weights = np.exp(scores - scores.max())
        out[bi, i, hi] = (weights / weights.sum()) @ v[bi, : i + 1, hi]
  return out


def _qkv(seed, shape=(2, 11, 3, 8)):
  rng = np.random.default_rng(seed)
  return [rng.normal(scale=2.0, size=shape).astype(np.float32) for _ in range(3)]


def test_geo_attention_matches_brute_force():
  q, k, v = _qkv(0)
  gamma = np.array([1.0, 8.0, 30.0], np.float32)
  out = geo_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(gamma))
  np.testing.assert_allclose(out, brute_force_geo_attention(q.astype(np.float64), k, v, gamma), atol=2e-5)


def test_dot_attention_matches_brute_force():
  q, k, v = _qkv(1)
  out = dot_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  np.testing.assert_allclose(out, brute_force_dot_attention(q.astype(np.float64), k, v), atol=2e-5)


def test_geo_attention_gradients_match_finite_differences():
  q, k, v = (jnp.asarray(x[:, :6]) for x in _qkv(2, (1, 6, 2, 4)))
  gamma = jnp.array([2.0, 5.0])
  loss = lambda q, k, v, g: jnp.sum(jnp.sin(geo_attention_reference(q, k, v, g)))
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, gamma)
  args = [q, k, v, gamma]
  rng = np.random.default_rng(3)
  for i, grad in enumerate(grads):
    direction = jnp.asarray(rng.normal(size=args[i].shape).astype(np.float32))
    eps = 1e-2
    plus = list(args); plus[i] = args[i] + eps * direction
    minus = list(args); minus[i] = args[i] - eps * direction
    numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=2e-2, atol=2e-3)
