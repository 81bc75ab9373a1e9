"""A model for inference from a training checkpoint: parameters only, laid out for the devices at hand.

The architecture comes from the config saved with the checkpoint (a checkpoint only fits the
model it was trained as); the fields that only choose how the model is computed (dtype,
kernels, remat, scan) come from the config of the current run. Parameters are restored
straight into the shardings of the caller's ShardingConfig (a mesh over the current devices and
the logical-axis rules), so a checkpoint written on 8 GPUs restores on one CPU and the other way
round; the optimizer state is never read.

Parameters keep training's dtype (float32; the forward pass computes in `model.dtype` exactly
as the training step does), so evaluation scores the model that training evaluated.
param_dtype="compute" stores them in the compute dtype instead (bf16: half the memory, at the
cost of rounding LayerNorm scales, biases and every weight); "auto" does that only when the
float32 parameters would take more than half of a device's memory, and logs it.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import psutil

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from neon_qtg_jax.config import MODEL_EXECUTION_FIELDS
from neon_qtg_jax.model.qtg import QTGModel
from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.checkpoint import checkpointer

log = logging.getLogger(__name__)

PARAM_DTYPES = ("float32", "compute", "auto")


@dataclasses.dataclass
class Restored:
  model: QTGModel
  step: int
  run_config: ml_collections.ConfigDict  # the config saved with the checkpoint
  sharding: ShardingConfig               # where the parameters live (pass it on to sampling.continue_prompts)
  param_dtype: str = "float32"           # the dtype the parameters were restored in


def device_memory_bytes() -> int:
  """Memory of one device: the accelerator's allocator limit, or the host's available memory on CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get("bytes_limit") or psutil.virtual_memory().available)


def choose_param_dtype(model_cfg: ml_collections.ConfigDict, state: nnx.State, policy: str) -> jnp.dtype:
  """float32 (training's), the compute dtype, or ("auto") float32 unless it takes over half a device's memory."""
  if policy not in PARAM_DTYPES:
    raise ValueError(f"param_dtype={policy!r}: must be one of {PARAM_DTYPES}")
  compute = jnp.dtype(model_cfg.dtype)
  if policy == "float32" or compute == jnp.float32:
    return jnp.dtype(jnp.float32)
  if policy == "compute":
    return compute
  need = 4 * sum(x.size for x in jax.tree.leaves(state))
  available = device_memory_bytes()
  if need <= available // 2:
    return jnp.dtype(jnp.float32)
  log.warning("parameters restored in %s, not training's float32 (%.1f GiB would take over half of %.1f GiB "
              "per device): outputs differ slightly from the trained model's", compute.name, need / 2**30,
              available / 2**30)
  return compute


def inference_model_config(run_config: ml_collections.ConfigDict,
                           current: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The checkpoint's model config with the execution fields of `current` (dropout off)."""
  model_cfg = ml_collections.ConfigDict(run_config.model.to_dict())
  if current is not None:
    for name in MODEL_EXECUTION_FIELDS:
      model_cfg[name] = current.model[name]
    differing = sorted(k for k in model_cfg.keys() if k not in MODEL_EXECUTION_FIELDS
                       and model_cfg[k] != current.model.get(k))
    if differing:
      log.warning("the checkpoint's model config differs from --config in %s; using the checkpoint's", differing)
  model_cfg.dropout = 0.0
  return model_cfg


def abstract_model(model_cfg: ml_collections.ConfigDict, sharding: ShardingConfig, param_dtype: str = "float32"
                   ) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph and shape-only state of the model, each parameter carrying its sharding under `sharding`.

  param_dtype: see PARAM_DTYPES and choose_param_dtype (Orbax casts while reading).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: QTGModel(model_cfg, rngs=nnx.Rngs(0))))
  shardings = sharding.params(state)
  dtype = choose_param_dtype(model_cfg, state, param_dtype)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s), state, shardings)
  return graphdef, state


def load_model(workdir_or_path: str, which: str | int = "best",
               config: ml_collections.ConfigDict | None = None, param_dtype: str = "float32", *,
               sharding: ShardingConfig) -> Restored:
  """Restores the parameters of one checkpoint into a ready model, placed by `sharding`.

  workdir_or_path: a run directory, its checkpoints/ directory or one step directory;
  which: a step number, "best", "latest" or a checkpoint path. sharding: the current run's
  (ShardingConfig.from_config(config.parallel)), or ShardingConfig.all_fsdp() without a run config.
  Raises FileNotFoundError naming the directory when there is no such checkpoint.
  """
  run_config = checkpointer.load_run_config(workdir_or_path, which)
  graphdef, abstract_state = abstract_model(inference_model_config(run_config, config), sharding, param_dtype)
  params, step = checkpointer.restore_params(workdir_or_path, which, abstract_state)
  dtype = jax.tree.leaves(abstract_state)[0].dtype.name
  return Restored(nnx.merge(graphdef, params), step, run_config, sharding, dtype)


def load_tokenizer(workdir_or_path: str, which: str | int = "best",
                   run_config: ml_collections.ConfigDict | None = None,
                   config: ml_collections.ConfigDict | None = None):
  """The tokenizer a checkpoint was trained with, from the checkpoint itself where it carries one.

  A checkpoint saved since the tokenizer became a checkpoint item (checkpointer.TOKENIZER_ITEM)
  needs no data directory: its sha256 is checked against the tokenizer.json saved beside it.
  An older one reads data_dir(run_config, config)'s tokenizer.
  """
  import base64
  import hashlib
  import json
  import tempfile
  from neon_qtg_jax.data.sources import DataError
  from neon_qtg_jax.data.tokenizer import INFO_FILE, MODEL_FILE, Tokenizer
  item = checkpointer.load_tokenizer_item(workdir_or_path, which)
  if item is None:
    if run_config is None:
      run_config = checkpointer.load_run_config(workdir_or_path, which)
    directory = data_dir(run_config, config)
    try:
      return Tokenizer.load(directory)
    except DataError as err:
      raise DataError(f"the checkpoint in {workdir_or_path!r} was saved without its tokenizer and {err}; pass "
                      "the run's prepared data directory as --config.data.data_dir=/abs/path") from None
  model = base64.b64decode(item["model_base64"])
  if hashlib.sha256(model).hexdigest() != item["info"]["sha256"]:
    raise DataError(f"the tokenizer saved with the checkpoint in {workdir_or_path!r} does not match its sha256")
  with tempfile.TemporaryDirectory(prefix="neon_qtg_tokenizer_") as tmp:  # SentencePiece reads it into memory
    with open(os.path.join(tmp, MODEL_FILE), "wb") as f:
      f.write(model)
    with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
      json.dump(item["info"], f)
    return Tokenizer.load(tmp)


def data_dir(run_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict | None = None) -> str:
  """The data directory to read a run's splits from: --config's data.data_dir where it differs from the one
  saved with the checkpoint (set on the command line), else the saved one (relative to where training ran)."""
  if config is not None and config.data.data_dir != run_config.data.data_dir:
    return config.data.data_dir
  return run_config.data.data_dir


def load_model_and_tokenizer(workdir_or_path: str, which: str | int = "best",
                             config: ml_collections.ConfigDict | None = None, *,
                             sharding: ShardingConfig):
  """load_model plus the run's tokenizer (load_tokenizer): (Restored, Tokenizer), the parameters placed by
  `sharding` (the run's ShardingConfig; a tool without a run config passes ShardingConfig.all_fsdp())."""
  restored = load_model(workdir_or_path, which, config, sharding=sharding)
  return restored, load_tokenizer(workdir_or_path, which, restored.run_config, config)
