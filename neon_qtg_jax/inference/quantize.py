"""Weight storage for inference: float32 (training's), bfloat16, or int8 matmul kernels through Qwix.

`inference.weight_dtype` chooses it for eval, generate, serve and the H200 compile table:

- "float32": the parameters as training keeps them (what `--mode=eval` has always scored);
- "bfloat16": every parameter rounded to bf16 (half the memory);
- "int8": every matmul kernel (each nnx.Linear, nnx.LinearGeneral and nnx.Einsum in the model
  tree, the output head included; found by type, not by name) stored as int8 with one float32
  scale per output channel (symmetric absmax, per layer for the stacked blocks), everything
  else in bf16. The kernel is Qwix's `QArray`; the module's `dot_general` becomes
  `qwix.dot_general`, which dequantizes into the compute dtype inside the matmul (XLA fuses
  the convert and the scale into the dot's operand), so activations stay in the compute dtype.

Qwix (google/qwix, the library MaxText quantizes with) is used for its numerics (`qwix.quantize`,
`QArray`, `qwix.dot_general`) rather than its model interception (`qwix.quantize_model`): that
path quantizes a weight the first time an intercepted `dot_general` meets it and writes the
result back into the calling module, but our blocks run as one module merged from stacked
parameters inside `lax.scan` (model/qtg.py, inference/decoding.py), so a write-back made inside
the scan body never reaches the model. Rewriting the kernels in the param tree once, before
any call, works for every forward pass (full, cached prefill and decode) unchanged.

The token and position embeddings stay bf16 under "int8": decoding reads one row of each per
token (no bandwidth to save) and they hold 3% of the 7b parameters (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx

from neon_qtg_jax.config import WEIGHT_DTYPES
from neon_qtg_jax.parallel import ShardingConfig

log = logging.getLogger(__name__)

MATMUL_MODULES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


@flax.struct.dataclass
class Int8Kernel:
  """A quantized matmul kernel: int8 values (the kernel's shape) and float32 scales (1 on contracted axes).

  Both are nnx Params carrying the kernel's logical axis names, so shardings, `nnx.split`, the
  layer scan's slicing and memory accounting see two ordinary arrays. Indexing (what nnx.Linear
  does with `self.kernel[...]`) gives Qwix's QArray of the raw arrays.
  """
  qvalue: nnx.Param
  scale: nnx.Param

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.qvalue.shape)

  def __getitem__(self, index: Any) -> qwix.QArray:
    return qwix.QArray(self.qvalue[index], self.scale[index], qtype=jnp.int8)


nnx.register_data_type(Int8Kernel)


def promote_with_qarray(args: tuple, /, *, dtype: Any = None, inexact: bool = True) -> tuple:
  """flax's promote_dtype for (inputs, kernel, bias) where the kernel may be a QArray.

  Arrays are cast as flax casts them; a QArray keeps its int8 values and gets its scale in the
  common dtype, which is the dtype Qwix dequantizes into.
  """
  arrays = tuple(None if isinstance(a, qwix.QArray) else a for a in args)
  promoted = nnx.nn.dtypes.promote_dtype(arrays, dtype=dtype, inexact=inexact)
  target = dtype if dtype is not None else next(a.dtype for a in promoted if a is not None)
  return tuple(a.astype(target) if isinstance(a, qwix.QArray) else p for a, p in zip(args, promoted))


def contracted_axes(module: nnx.Module, kernel_ndim: int) -> tuple[int, ...]:
  """The kernel axes a matmul module sums over, counted after any leading stacked (layer) axes."""
  if isinstance(module, nnx.Linear):
    own_ndim, own = 2, (0,)
  elif isinstance(module, nnx.LinearGeneral):
    batch, n_in = len(module.batch_axis), len(module.in_features)
    own_ndim, own = batch + n_in + len(module.out_features), tuple(range(batch, batch + n_in))
  elif isinstance(module, nnx.Einsum):
    equation = module.einsum_str.replace(" ", "")
    inputs, output = equation.split("->")
    kernel_letters = inputs.split(",")[1]
    if "..." in kernel_letters:
      raise ValueError(f"nnx.Einsum {equation!r}: an ellipsis in the kernel operand is not supported")
    own_ndim = len(kernel_letters)
    own = tuple(i for i, letter in enumerate(kernel_letters) if letter not in output)
  else:
    raise TypeError(f"{type(module).__name__} is not a matmul module")
  lead = kernel_ndim - own_ndim
  if lead < 0:
    raise ValueError(f"{type(module).__name__} kernel has {kernel_ndim} axes, fewer than its {own_ndim}")
  return tuple(lead + a for a in own)


def _quantize_kernel(kernel: jax.Array, contracted: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(int8 values, float32 scales) with one scale per index of every axis that is not contracted."""
  channelwise = [a for a in range(kernel.ndim) if a not in contracted]
  q = qwix.quantize(kernel.astype(jnp.float32), jnp.int8, channelwise_axes=channelwise)
  return q.qvalue, q.scale


def matmul_modules(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  """(path, module) of every matmul module whose kernel is still a float array."""
  return [(path, m) for path, m in nnx.iter_graph(model)
          if isinstance(m, MATMUL_MODULES) and isinstance(getattr(m, "kernel", None), nnx.Param)]


def quantize_kernels(model: nnx.Module, *, skip: str | None = None) -> int:
  """Replaces every matmul kernel of `model` (in place) by an Int8Kernel; returns how many.

  skip: a regular expression over the module path ("blocks/w_1", "head") left unquantized.
  Runs each kernel through its own small jit, so at most one float kernel and its int8 copy
  are in flight beyond the model itself; works on abstract models (nnx.eval_shape) too.
  """
  count = 0
  for path, module in matmul_modules(model):
    name = "/".join(str(p) for p in path)
    if skip and re.fullmatch(skip, name):
      continue
    kernel = module.kernel
    contracted = contracted_axes(module, kernel.ndim)
    qvalue, scale = jax.jit(_quantize_kernel, static_argnums=1)(kernel[...], contracted)
    metadata = kernel.get_metadata()
    module.kernel = Int8Kernel(nnx.Param(qvalue, **metadata), nnx.Param(scale, **metadata))
    module.promote_dtype = promote_with_qarray
    if isinstance(module, nnx.Einsum):
      module.einsum_op = qwix.einsum
    else:
      module.dot_general = qwix.dot_general
    count += 1
  return count


def cast_float_params(model: nnx.Module, dtype: Any) -> None:
  """Casts every floating-point nnx.Param of `model` (in place) to dtype, except int8 kernels' scales."""
  for path, variable in nnx.iter_graph(model):
    if not isinstance(variable, nnx.Param) or path[-1] == "scale" and isinstance(_parent(model, path), Int8Kernel):
      continue
    if jnp.issubdtype(variable.dtype, jnp.floating) and variable.dtype != dtype:
      variable.value = variable[...].astype(dtype)


def _parent(model: nnx.Module, path: tuple) -> Any:
  node = model
  for key in path[:-1]:
    node = getattr(node, key) if not isinstance(key, int) else node[key]
  return node


def apply_weight_dtype(model: nnx.Module, weight_dtype: str) -> nnx.Module:
  """Stores `model`'s parameters as weight_dtype (WEIGHT_DTYPES), in place; returns the model."""
  if weight_dtype not in WEIGHT_DTYPES:
    raise ValueError(f"weight_dtype={weight_dtype!r}: must be one of {WEIGHT_DTYPES}")
  if weight_dtype == "float32":
    return model
  if weight_dtype == "int8":
    quantize_kernels(model)
  cast_float_params(model, jnp.bfloat16)
  return model


def parameter_bytes(model: nnx.Module) -> int:
  """Bytes of every parameter array (int8 values and their scales counted separately)."""
  state = nnx.state(model, nnx.Param)
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def abstract_inference_model(model_cfg: ml_collections.ConfigDict, weight_dtype: str
                             ) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph and shape-only state of the model as inference stores it under weight_dtype (nothing allocated)."""
  from neon_qtg_jax.model.qtg import QTGModel

  def build():
    return apply_weight_dtype(QTGModel(model_cfg, rngs=nnx.Rngs(0)), weight_dtype)
  return nnx.split(nnx.eval_shape(build))


@dataclasses.dataclass
class InferenceModel:
  """A restored model stored as weight_dtype, with what eval and the server report."""
  model: nnx.Module
  step: int
  run_config: ml_collections.ConfigDict
  param_dtype: str       # the dtype the checkpoint was restored in, before weight_dtype was applied
  weight_dtype: str
  parameter_bytes: int
  sharding: ShardingConfig  # where the parameters live (pass it on to sampling and the decode cache)


def load_for_inference(workdir_or_path: str, which: str | int, config: ml_collections.ConfigDict,
                       param_dtype: str = "float32", *, sharding: ShardingConfig) -> InferenceModel:
  """restore.load_model, then config.inference.weight_dtype applied to the restored parameters.

  param_dtype: what "float32" weights restore as (restore.PARAM_DTYPES: eval keeps training's
  float32, generate and serve use "auto"). bfloat16 and int8 restore as "auto" (float32 where it
  fits, so the int8 scales come from training's values) and convert one kernel at a time.
  sharding: the caller's mesh and rules (restore.load_model).
  """
  from neon_qtg_jax.inference.restore import load_model
  weight_dtype = config.inference.weight_dtype
  restored = load_model(workdir_or_path, which, config, param_dtype if weight_dtype == "float32" else "auto",
                        sharding=sharding)
  model = apply_weight_dtype(restored.model, weight_dtype)
  size = parameter_bytes(model)
  log.info("parameters stored as %s: %.1f MiB", weight_dtype, size / 2**20)
  return InferenceModel(model, restored.step, restored.run_config, restored.param_dtype, weight_dtype, size, sharding)
