"""Generation without a cache: the full forward pass over the whole buffer at every step.

The reference that cached decoding is measured and tested against. Prompts must have equal
lengths (the plain forward pass has no padding mask).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from neon_qtg_jax.inference.sampling import SamplingParams, sample_tokens
from neon_qtg_jax.model.qtg import QTGModel


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "max_new_tokens"))
def _recompute_loop(graphdef: nnx.GraphDef, state: nnx.State, prompts: jax.Array, key: jax.Array, steps: jax.Array,
                    *, params: SamplingParams, max_new_tokens: int) -> jax.Array:
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompts.shape
  buffer = jnp.concatenate([prompts, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)

  def body(step, buffer):
    # Causal model: the unfilled slots after the current one do not change its logits.
    logits = jax.lax.dynamic_index_in_dim(model(buffer), prompt_len + step - 1, axis=1, keepdims=False)
    token = sample_tokens(logits, jax.random.fold_in(key, step), params)
    return jax.lax.dynamic_update_slice(buffer, token[:, None], (0, prompt_len + step))

  buffer = jax.lax.fori_loop(0, steps, body, buffer)
  return buffer[:, prompt_len:]


def generate_recompute(model: QTGModel, prompt_ids: list[list[int]], *, params: SamplingParams,
                       max_new_tokens: int, seed: int, steps: int | None = None) -> list[list[int]]:
  """max_new_tokens new tokens per prompt (no EOS stop), same sampling and keys as `continue_prompts`.

  steps < max_new_tokens runs only that many steps (the rest stay 0) with the same compiled
  program: every step costs the same, one forward pass over all prompt + max_new_tokens slots.
  """
  lengths = {len(p) for p in prompt_ids}
  if len(lengths) != 1:
    raise ValueError(f"generate_recompute: prompts must have equal lengths, got {sorted(lengths)}")
  if lengths.pop() + max_new_tokens > model.cfg.max_seq_len:
    raise ValueError(f"generate_recompute: prompt + max_new_tokens exceeds model.max_seq_len={model.cfg.max_seq_len}")
  graphdef, state = nnx.split(model)
  steps = max_new_tokens if steps is None else steps
  out = _recompute_loop(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), jax.random.key(seed),
                        jnp.int32(steps), params=params, max_new_tokens=max_new_tokens)
  return jax.device_get(out).tolist()
