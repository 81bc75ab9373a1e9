"""Every production program as an abstract lowering: train step, eval step, prefill, one decode step.

Each function lowers its program for a mesh over a compile target's devices (parallel/targets)
from ShapeDtypeStructs with shardings, so nothing is allocated and the target need not be
attached. memory_test.compile_report compiles one and reads XLA's memory analysis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neon_qtg_jax import parallel
from neon_qtg_jax.inference import decoding, quantize
from neon_qtg_jax.model.qtg import QTGModel
from neon_qtg_jax.training import memory_test
from neon_qtg_jax.training import train_step as ts


def _abstract(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def lower_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
  step = ts.make_train_step(config, ts.model_graphdef(config), mesh)
  return step.lower(*memory_test.abstract_inputs(config, mesh))


def lower_eval_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Any:
  """One evaluation batch of training.batch_size windows against the float32 training parameters."""
  params = ts.sharded_abstract_state(config, mesh).params
  rows = config.training.batch_size
  token = _abstract((rows, config.data.max_length), jnp.int32, parallel.batch_sharding(mesh, config.parallel.rules))
  return ts.make_eval_step(config, ts.model_graphdef(config), mesh).lower(params, {"inputs": token, "targets": token})


def inference_state(model_cfg: ml_collections.ConfigDict, mesh: Mesh, weight_dtype: str
                    ) -> tuple[nnx.GraphDef, nnx.State]:
  """The model as inference stores it under `inference.weight_dtype` (inference/quantize.py), FSDP-sharded."""
  graphdef, state = quantize.abstract_inference_model(model_cfg, weight_dtype)
  state = jax.tree.map(lambda x, s: _abstract(x.shape, x.dtype, s), state, parallel.param_shardings(state, mesh))
  return graphdef, state


def abstract_cache(model_cfg: ml_collections.ConfigDict, mesh: Mesh, batch: int, size: int) -> decoding.DecodeCache:
  """decoding.init_cache's shapes with decoding.shard_cache's placement."""
  model = nnx.eval_shape(lambda: QTGModel(model_cfg, rngs=nnx.Rngs(0)))
  cache = jax.eval_shape(lambda: decoding.init_cache(model, batch, size))
  fsdp = mesh.shape["fsdp"]

  def place(x, axis):
    if x is None:
      return None
    spec = [None] * len(x.shape)
    if axis is not None and x.shape[axis] % fsdp == 0:
      spec[axis] = "fsdp"
    return _abstract(x.shape, x.dtype, NamedSharding(mesh, PartitionSpec(*spec)))
  return decoding.DecodeCache(place(cache.keys, 3), place(cache.values, 3), place(cache.phi, 3),
                              place(cache.valid, None))


def _tokens(mesh: Mesh, batch: int, length: int, dtype: Any) -> jax.ShapeDtypeStruct:
  return _abstract((batch, length), dtype, parallel.replicated(mesh))


def lower_prefill(config: ml_collections.ConfigDict, mesh: Mesh, batch: int, context: int) -> Any:
  """The prompt pass of sampling: `context` tokens into an empty cache of `context + 1` slots."""
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.dropout = 0.0
  graphdef, state = inference_state(model_cfg, mesh, config.inference.weight_dtype)
  cache = abstract_cache(model_cfg, mesh, batch, context + 1)

  def prefill(state, cache, tokens, positions, valid):
    return decoding.forward_cached(nnx.merge(graphdef, state), cache, tokens, positions, 0, valid, last_only=True)
  return jax.jit(prefill, donate_argnums=(1,)).lower(
      state, cache, _tokens(mesh, batch, context, jnp.int32), _tokens(mesh, batch, context, jnp.int32),
      _tokens(mesh, batch, context, jnp.bool_))


def lower_decode_step(config: ml_collections.ConfigDict, mesh: Mesh, batch: int, context: int) -> Any:
  """One sampled token against a cache of `context` slots (the loop body of sampling._decode_loop)."""
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.dropout = 0.0
  graphdef, state = inference_state(model_cfg, mesh, config.inference.weight_dtype)
  cache = abstract_cache(model_cfg, mesh, batch, context)

  def decode(state, cache, token, position, start, valid):
    return decoding.forward_cached(nnx.merge(graphdef, state), cache, token, position, start, valid)
  scalar = _abstract((), jnp.int32, parallel.replicated(mesh))
  return jax.jit(decode, donate_argnums=(1,)).lower(
      state, cache, _tokens(mesh, batch, 1, jnp.int32), _tokens(mesh, batch, 1, jnp.int32), scalar,
      _tokens(mesh, batch, 1, jnp.bool_))


def with_model(config: ml_collections.ConfigDict, **model_fields: Any) -> ml_collections.ConfigDict:
  """A copy of `config` with some model fields changed (e.g. attention_impl)."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.model.update(**model_fields)
  return out


def production_programs(config: ml_collections.ConfigDict, mesh: Mesh, *, batch: int, context: int
                        ) -> dict[str, Any]:
  """name -> a thunk lowering that program: the train step under each attention_impl that runs on a
  GPU, the eval step, the prefill of `context` tokens and one decode step against `context` slots."""
  return {
      "train step (blockwise)": lambda: lower_train_step(with_model(config, attention_impl="blockwise"), mesh),
      "train step (pallas)": lambda: lower_train_step(with_model(config, attention_impl="pallas"), mesh),
      "train step, dot baseline (pallas: cuDNN)": lambda: lower_train_step(
          with_model(config, attention_impl="pallas", attention="dot", topofilter=False), mesh),
      "eval step": lambda: lower_eval_step(config, mesh),
      f"prefill (batch {batch}, {context} tokens)": lambda: lower_prefill(config, mesh, batch, context),
      f"decode step (batch {batch}, {context} slots)": lambda: lower_decode_step(config, mesh, batch, context),
  }
