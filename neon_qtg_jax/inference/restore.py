"""A model for inference from a training checkpoint: parameters only, laid out for the devices at hand.

The architecture comes from the config saved with the checkpoint (a checkpoint only fits the
model it was trained as); the fields that only choose how the model is computed (dtype,
kernels, remat, scan) come from the config of the current run. Parameters are restored
straight into the FSDP shardings of a mesh over the current devices, so a checkpoint written
on 8 GPUs restores on one CPU and the other way round; the optimizer state is never read.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from neon_qtg_jax.model.qtg import QTGModel
from neon_qtg_jax.parallel.mesh import make_mesh
from neon_qtg_jax.parallel.sharding import param_shardings
from neon_qtg_jax.training import checkpointing

log = logging.getLogger(__name__)

# Model fields that change how the forward pass is computed, not what it computes.
EXECUTION_FIELDS = ("dtype", "attention_impl", "blockwise_min_len", "block_q", "block_k", "remat", "scan_layers",
                    "dropout")


@dataclasses.dataclass
class Restored:
  model: QTGModel
  step: int
  run_config: ml_collections.ConfigDict  # the config saved with the checkpoint


def inference_model_config(run_config: ml_collections.ConfigDict,
                           current: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The checkpoint's model config with the execution fields of `current` (dropout off)."""
  model_cfg = ml_collections.ConfigDict(run_config.model.to_dict())
  if current is not None:
    for name in EXECUTION_FIELDS:
      model_cfg[name] = current.model[name]
    differing = sorted(k for k in model_cfg.keys() if k not in EXECUTION_FIELDS
                       and model_cfg[k] != current.model.get(k))
    if differing:
      log.warning("the checkpoint's model config differs from --config in %s; using the checkpoint's", differing)
  model_cfg.dropout = 0.0
  return model_cfg


def abstract_model(model_cfg: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph and shape-only state of the model, each parameter carrying its FSDP sharding on all devices.

  Parameters take the compute dtype (`model.dtype`): inference needs no float32 master copy, so
  a bf16 model restores at half the memory (Orbax casts while reading).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: QTGModel(model_cfg, rngs=nnx.Rngs(0))))
  shardings = param_shardings(state, make_mesh())
  dtype = jnp.dtype(model_cfg.dtype)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s), state, shardings)
  return graphdef, state


def load_model(workdir_or_path: str, which: str | int = "best",
               config: ml_collections.ConfigDict | None = None) -> Restored:
  """Restores the parameters of one checkpoint into a ready model.

  workdir_or_path: a run directory, its checkpoints/ directory or one step directory;
  which: a step number, "best", "latest" or a checkpoint path. Raises FileNotFoundError
  naming the directory when there is no such checkpoint.
  """
  run_config = checkpointing.load_run_config(workdir_or_path, which)
  graphdef, abstract_state = abstract_model(inference_model_config(run_config, config))
  params, step = checkpointing.restore_params(workdir_or_path, which, abstract_state)
  return Restored(nnx.merge(graphdef, params), step, run_config)


def load_model_and_tokenizer(workdir_or_path: str, which: str | int = "best",
                             config: ml_collections.ConfigDict | None = None):
  """load_model plus the run's tokenizer (from the data_dir saved in its config): (Restored, Tokenizer)."""
  from neon_qtg_jax.data.tokenizer import Tokenizer
  restored = load_model(workdir_or_path, which, config)
  return restored, Tokenizer.load(restored.run_config.data.data_dir)
