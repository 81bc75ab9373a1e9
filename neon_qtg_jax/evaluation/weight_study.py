"""What storing weights in bf16 or int8, and the cache's unit states in bf16, costs: bits/byte and decode speed.

Every variant is scored on the same token stream by the same sliding windows
(evaluation/perplexity.py), in the same process, so the differences are the storage alone.
The cache variants score through the cached forward pass (inference/decoding.py: each window
is one prefill into an empty cache), where the unit states phi are read back from the cache.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neon_qtg_jax.evaluation.perplexity import LogProbFn, score_stream, summary
from neon_qtg_jax.inference import decoding, quantize
from neon_qtg_jax.inference.sampling import continue_prompts_with_stats
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.loss import target_log_probs


@functools.partial(jax.jit, static_argnames=("graphdef", "phi_dtype"))
def _cached_log_probs(graphdef, state, inputs, targets, *, phi_dtype):
  model = nnx.merge(graphdef, state)
  cache = decoding.init_cache(model, inputs.shape[0], inputs.shape[1])
  if cache.phi is not None:
    cache = cache._replace(phi=cache.phi.astype(phi_dtype))
  positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
  logits, _ = decoding.forward_cached(model, cache, inputs, positions, 0, jnp.ones(inputs.shape, bool))
  return target_log_probs(logits, targets)


def cached_log_prob_fn(model: nnx.Module, phi_dtype: Any) -> LogProbFn:
  """log p(target) through one prefill per window, the cache's unit states stored as phi_dtype."""
  graphdef, state = nnx.split(model)
  return lambda inputs, targets: jax.device_get(_cached_log_probs(
      graphdef, state, jnp.asarray(inputs), jnp.asarray(targets), phi_dtype=jnp.dtype(phi_dtype).name))


def decode_tokens_per_second(model: nnx.Module, sampling_cfg: Any, *, prompt_len: int, new_tokens: int,
                             sharding: ShardingConfig, batch: int = 1, repeats: int = 3) -> float:
  """Greedy cached decoding of random prompts, best of `repeats` after a compiling warm-up (tokens/s)."""
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, model.cfg.vocab_size, (batch, prompt_len)).tolist()
  run = functools.partial(continue_prompts_with_stats, model, prompts, sampling_cfg=sampling_cfg,
                          max_new_tokens=new_tokens, eos_id=None, seed=0, sharding=sharding)
  run()
  return max(run()[1].decode_tokens_per_second for _ in range(repeats))


def score(log_prob_fn: LogProbFn, tokens: np.ndarray, text_bytes: int, *, max_length: int, stride: int,
          batch_size: int) -> dict[str, Any]:
  began = time.perf_counter()
  result = summary(score_stream(log_prob_fn, tokens, max_length=max_length, stride=stride, batch_size=batch_size,
                                progress=False), text_bytes)
  return result | {"seconds": time.perf_counter() - began}


def weight_variants(build) -> dict[str, nnx.Module]:
  """name -> model: float32, bfloat16, int8 (every matmul kernel), int8 with the head kept bf16.

  build: () -> a fresh float32 model (the restored checkpoint).
  """
  int8_bf16_head = build()
  quantize.quantize_kernels(int8_bf16_head, skip="head")
  quantize.cast_float_params(int8_bf16_head, jnp.bfloat16)
  return {"float32": build(), "bfloat16": quantize.apply_weight_dtype(build(), "bfloat16"),
          "int8": quantize.apply_weight_dtype(build(), "int8"), "int8, head bf16": int8_bf16_head}


def decode_bytes_per_token(model_cfg, weight_dtype: str, context: int) -> dict[str, int]:
  """Bytes a batch-1 decode step reads from memory at `context` cache slots, from abstract shapes.

  Every parameter is read once per token except the embedding tables, of which one row each
  (token and position) is gathered; the whole cache is read by attention and the TopoFilter.
  """
  graphdef, state = quantize.abstract_inference_model(model_cfg, weight_dtype)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  weights, tables = 0, 0
  for path, leaf in leaves:
    size = leaf.size * jnp.dtype(leaf.dtype).itemsize
    name = jax.tree_util.keystr(path)
    if "'embed'" in name:  # token and position tables: one row each per token
      tables += size
      weights += size // leaf.shape[0]
    else:
      weights += size
  model = nnx.eval_shape(lambda: nnx.merge(graphdef, state))
  cache = jax.eval_shape(lambda: decoding.init_cache(model, 1, context))
  cache_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))
  return {"weights": weights, "embedding_tables": tables, "cache": cache_bytes, "total": weights + cache_bytes}
