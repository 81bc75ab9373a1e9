"""Every production program as an abstract lowering: fresh start, train step, eval step, prefill, one decode step.

This is the one module that lowers programs. Each function lowers its program under a
ShardingConfig (a mesh over a compile target's devices, parallel/targets, and the run's rules) from
ShapeDtypeStructs with shardings, so nothing is allocated and the target need not be attached.
memory_report.compile_report compiles one and reads XLA's memory analysis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from neon_qtg_jax.inference import decoding, quantize
from neon_qtg_jax.model.qtg import QTGModel
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.training import train_step as ts


def abstract_inputs(config: ml_collections.ConfigDict, sharding: ShardingConfig) -> tuple[ts.TrainState, ts.Batch]:
  """The train step's arguments as sharded ShapeDtypeStructs."""
  t = config.training
  rows = t.batch_size * t.grad_accum_steps
  token = jax.ShapeDtypeStruct((rows, config.data.max_length), jnp.int32, sharding=sharding.batch())
  return ts.sharded_abstract_state(config, sharding), {"inputs": token, "targets": token}


def lower_init(config: ml_collections.ConfigDict, sharding: ShardingConfig) -> Any:
  """The fresh-start program: parameters and AdamW state built in their shards from a PRNG key.

  A resume runs no program: Orbax reads the checkpoint straight into the sharded state.
  """
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated())
  return ts.init_fn(config, sharding).lower(key)


def lower_train_step(config: ml_collections.ConfigDict, sharding: ShardingConfig) -> Any:
  step = ts.make_train_step(config, ts.model_graphdef(config), sharding)
  return step.lower(*abstract_inputs(config, sharding))


def lower_eval_step(config: ml_collections.ConfigDict, sharding: ShardingConfig) -> Any:
  """One evaluation batch of training.batch_size windows against the float32 training parameters."""
  params = ts.sharded_abstract_state(config, sharding).params
  token = jax.ShapeDtypeStruct((config.training.batch_size, config.data.max_length), jnp.int32,
                               sharding=sharding.batch())
  return ts.make_eval_step(config, ts.model_graphdef(config), sharding).lower(params, {"inputs": token,
                                                                                       "targets": token})


def inference_state(model_cfg: ml_collections.ConfigDict, sharding: ShardingConfig, weight_dtype: str
                    ) -> tuple[nnx.GraphDef, nnx.State]:
  """The model as inference stores it under `inference.weight_dtype` (inference/quantize.py), sharded."""
  graphdef, state = quantize.abstract_inference_model(model_cfg, weight_dtype)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sharding.params(state))
  return graphdef, state


def abstract_cache(model_cfg: ml_collections.ConfigDict, sharding: ShardingConfig, batch: int, size: int
                   ) -> decoding.DecodeCache:
  """decoding.init_cache's shapes with decoding.cache_shardings' placement."""
  model = nnx.eval_shape(lambda: QTGModel(model_cfg, rngs=nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: decoding.init_cache(model, batch, size))
  return decoding.DecodeCache(*(None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                for x, s in zip(cache, decoding.cache_shardings(cache, sharding))))


def _tokens(sharding: ShardingConfig, batch: int, length: int, dtype: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, length), dtype, sharding=sharding.replicated())


def _inference_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.dropout = 0.0
  return model_cfg


def lower_prefill(config: ml_collections.ConfigDict, sharding: ShardingConfig, batch: int, context: int) -> Any:
  """The prompt pass of sampling: `context` tokens into an empty cache of `context + 1` slots."""
  model_cfg = _inference_model_config(config)
  graphdef, state = inference_state(model_cfg, sharding, config.inference.weight_dtype)
  cache = abstract_cache(model_cfg, sharding, batch, context + 1)

  def prefill(state, cache, tokens, positions, valid):
    return decoding.forward_cached(nnx.merge(graphdef, state), cache, tokens, positions, 0, valid, last_only=True)
  return jax.jit(prefill, donate_argnums=(1,)).lower(
      state, cache, _tokens(sharding, batch, context, jnp.int32), _tokens(sharding, batch, context, jnp.int32),
      _tokens(sharding, batch, context, jnp.bool_))


def lower_decode_step(config: ml_collections.ConfigDict, sharding: ShardingConfig, batch: int, context: int) -> Any:
  """One sampled token against a cache of `context` slots (the loop body of sampling._decode_loop)."""
  model_cfg = _inference_model_config(config)
  graphdef, state = inference_state(model_cfg, sharding, config.inference.weight_dtype)
  cache = abstract_cache(model_cfg, sharding, batch, context)

  def decode(state, cache, token, position, start, valid):
    return decoding.forward_cached(nnx.merge(graphdef, state), cache, token, position, start, valid)
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated())
  return jax.jit(decode, donate_argnums=(1,)).lower(
      state, cache, _tokens(sharding, batch, 1, jnp.int32), _tokens(sharding, batch, 1, jnp.int32), scalar,
      _tokens(sharding, batch, 1, jnp.bool_))


def with_model(config: ml_collections.ConfigDict, **model_fields: Any) -> ml_collections.ConfigDict:
  """A copy of `config` with some model fields changed (e.g. attention_impl)."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.model.update(**model_fields)
  return out


def production_programs(config: ml_collections.ConfigDict, sharding: ShardingConfig, *, batch: int, context: int
                        ) -> dict[str, Any]:
  """name -> a thunk lowering that program: the train step under each attention_impl that runs on a
  GPU, the eval step, the prefill of `context` tokens and one decode step against `context` slots."""
  return {
      "train step (blockwise)": lambda: lower_train_step(with_model(config, attention_impl="blockwise"), sharding),
      "train step (pallas)": lambda: lower_train_step(with_model(config, attention_impl="pallas"), sharding),
      "train step, dot baseline (pallas: cuDNN)": lambda: lower_train_step(
          with_model(config, attention_impl="pallas", attention="dot", topofilter=False), sharding),
      "eval step": lambda: lower_eval_step(config, sharding),
      f"prefill (batch {batch}, {context} tokens)": lambda: lower_prefill(config, sharding, batch, context),
      f"decode step (batch {batch}, {context} slots)": lambda: lower_decode_step(config, sharding, batch, context),
  }
