"""Timing, compiled-memory and error measurements shared by tools/bench_kernels.py and tools/device_check.py."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
  median_s: float
  min_s: float
  repeats: int


def time_compiled(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1) -> Timing:
  """Wall time of a jitted fn(*args), blocking on every output; compilation is excluded by the warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return Timing(statistics.median(times), min(times), repeats)


def temp_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """XLA's temporary (scratch) bytes for the compiled fn(*args): the arrays alive inside it, not its inputs or outputs."""
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  if analysis is None:
    raise RuntimeError(f"XLA gives no memory analysis on backend {jax.default_backend()!r}")
  return int(analysis.temp_size_in_bytes)


def loss_and_grads(attn: Callable[..., jax.Array], num_args: int) -> Callable[..., Any]:
  """fwd+bwd of sum(attn(*args) * cotangent): value and gradients with respect to the first num_args args."""
  def loss(*args):
    *inputs, cotangent = args
    return jnp.sum(attn(*inputs).astype(jnp.float32) * cotangent)
  return jax.value_and_grad(loss, argnums=tuple(range(num_args)))


def max_relative_error(actual: Any, expected: Any) -> float:
  """max |actual - expected| / max |expected| over the leaves of two pytrees, in float32."""
  errors = jax.tree.map(
      lambda a, e: jnp.max(jnp.abs(a.astype(jnp.float32) - e.astype(jnp.float32)))
      / jnp.maximum(jnp.max(jnp.abs(e.astype(jnp.float32))), 1e-30), actual, expected)
  return float(max(jax.tree.leaves(errors)))


def attention_flops(batch: int, length: int, heads: int, head_dim: int, *, causal: bool = True,
                    backward: bool = True) -> float:
  """Matmul FLOPs of attention as FlashAttention-2's benchmark counts them: 4 B L^2 H hd forward
  (QK^T and PV), the backward 2.5 times that (five products), halved for causal masking."""
  forward = 4.0 * batch * length * length * heads * head_dim
  total = forward * (3.5 if backward else 1.0)
  return total / 2 if causal else total
