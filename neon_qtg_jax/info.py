"""--mode=info: parameter count, training memory, FLOPs and time estimates from abstract shapes.

Nothing is allocated: the model is built under `nnx.eval_shape`, so the 100b config is planned
on a laptop. Memory and time are estimates (stated as such); the parameter count is exact.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from neon_qtg_jax.model import QTGModel
from neon_qtg_jax.model import attention as attention_kinds
from neon_qtg_jax.model.qtg import attention_dim
from neon_qtg_jax.parallel import targets
from neon_qtg_jax.parallel.mesh import mesh_shape

# Dense bf16 tensor-core peak (FLOP/s) per accelerator from the vendors' data sheets (SXM parts),
# and memory in bytes as the CUDA driver reports it: "80 GB" is 79.6 GiB, "141 GB" is 140.4 GiB
# (the H200's is parallel/targets/h200.txtpb's). float32 compute runs as TF32 at half the bf16 rate.
ACCELERATORS: dict[str, dict[str, float]] = {
    "H100": {"peak_bf16": 989e12, "memory": 81559 * 2**20},
    "H200": {"peak_bf16": 989e12, "memory": 143771 * 2**20},
}
_DEVICE_KIND_KEYS = {"h200": "H200", "h100": "H100", "a100": "A100"}
_PEAK_BY_KIND = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """Peak dense FLOP/s of a jax device_kind string (e.g. "NVIDIA H200"), None if unknown (CPU)."""
  lowered = device_kind.lower()
  for key, name in _DEVICE_KIND_KEYS.items():
    if key in lowered:
      peak = _PEAK_BY_KIND[name]
      return peak if dtype == "bfloat16" else peak / 2
  return None


def abstract_model_state(model_cfg: ml_collections.ConfigDict) -> nnx.State:
  """The model's parameter state as ShapeDtypeStructs (no allocation)."""
  abstract_model = nnx.eval_shape(lambda: QTGModel(model_cfg, rngs=nnx.Rngs(0)))
  return nnx.state(abstract_model, nnx.Param)


def parameter_breakdown(model_cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Exact parameter counts per component ("blocks.w_qkv" sums over layers), ordered as built."""
  state = abstract_model_state(model_cfg)
  counts: dict[str, int] = defaultdict(int)
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
    keys = [str(getattr(p, "key", p)) for p in path]
    component = ".".join(keys[:3] if keys[:2] == ["blocks", "attn"] else keys[:2])
    counts[component] += int(np.prod(leaf.shape))
  return dict(counts)


def block_matmul_parameters(model_cfg: ml_collections.ConfigDict) -> int:
  """Weights of one block's matrices: W_psi (4 d^2, optional), W_qkv (2d x 3a), W_O (a x 2d), the MLP,
  with a the attention width (d by default)."""
  d, a = model_cfg.embed_dim, attention_dim(model_cfg)
  w_psi = 4 * d * d if model_cfg.w_psi else 0
  return w_psi + 6 * d * a + 2 * a * d + 2 * (2 * d * model_cfg.mlp_ratio * d)


def spec_block_parameters(model_cfg: ml_collections.ConfigDict) -> int:
  """The spec's count for one block: 28 d^2 for the matrices (mlp_ratio 4; 24 d^2 without W_psi) plus
  norms and gamma."""
  d = model_cfg.embed_dim
  matrices = block_matmul_parameters(model_cfg)
  norms = 2 * (2 * d) * (2 if model_cfg.norm == "layernorm" else 1)
  w_psi_bias = 2 * d if model_cfg.w_psi else 0
  a = attention_dim(model_cfg)
  biases = (w_psi_bias + 3 * a + 2 * d + model_cfg.mlp_ratio * d + 2 * d) if model_cfg.use_bias else 0
  scales = model_cfg.num_heads * attention_kinds.get(model_cfg.attention).scales_per_head(model_cfg)
  return matrices + norms + biases + scales


def flops_per_token(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Model FLOPs per token: forward parts and the training total (forward + backward = 3x forward).

  Attention and filter count the causal half of the L x L work at the training window L.
  Remat recomputation is not model FLOPs and is not counted (the usual MFU convention).
  """
  m = config.model
  d, n, length = m.embed_dim, m.num_layers, config.data.max_length
  matmuls = 2.0 * (n * block_matmul_parameters(m) + 2 * d * m.vocab_size)
  # The attention kind's FLOPs per query (QK^T and A V) over, on average, L/2 keys, for every layer.
  attention = n * attention_kinds.get(m.attention).flops_per_query(attention_dim(m), length / 2)
  topofilter = n * 2.0 * (2 * d) * length / 2 if m.topofilter else 0.0
  forward = matmuls + attention + topofilter
  return {"matmuls": matmuls, "attention": attention, "topofilter": topofilter,
          "forward": forward, "train": 3.0 * forward}


def _activation_bytes_per_token_layer(m: ml_collections.ConfigDict, length: int,
                                      heads_split: int = 1, mlp_split: int = 1) -> dict[str, float]:
  """Bytes saved for the backward pass per token and layer, for each remat policy (estimate).

  Heads are split over `heads_split` devices and the FFN hidden axis over `mlp_split` (the mesh axes
  the "act_heads" and "mlp" rules name); the 2d-wide states are not split.
  """
  d, a, c = m.embed_dim, attention_dim(m), (2 if m.dtype == "bfloat16" else 4)
  hidden = m.mlp_ratio * d / mlp_split
  qkv, heads_out, heads = 3 * a / heads_split, a / heads_split, m.num_heads / heads_split
  # No remat: norms, psi, f, qkv, sphere points, attention out, MLP in/out, residuals, and the
  # per-head softmax row (H x L floats per query, fp32) of the reference attention.
  everything = (c * (2 * d * 4 + qkv + heads_out + 2 * hidden) + 4 * (2 * d * 3 + 2 * d)
                + 4 * heads * length + 4 * length)
  dots = c * (2 * d + qkv + 2 * d + hidden + 2 * d) + 4 * 2 * d + 4 * heads * length
  block_input = 4 * 2 * d
  return {"none": everything, "dots": dots, "dots_no_batch": dots, "block": block_input}


def mesh_sizes(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """{data, fsdp, tensor}: the config's mesh over num_devices, in-node times across-node sizes."""
  ici, dcn = mesh_shape(config.parallel, num_devices)
  return {axis: ici[axis] * dcn[axis] for axis in ici}


def axis_splits(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """{logical axis name: how many ways the config's rules (parallel.rules) split it} on the config's
  mesh over num_devices: the product of the sizes of the mesh axes the name's rule lists."""
  sizes = mesh_sizes(config, num_devices)
  return {name: math.prod(sizes[axis] for axis in axes) for name, axes in config.parallel.rules}


def training_memory(config: ml_collections.ConfigDict, num_params: int, num_devices: int = 1) -> dict[str, float]:
  """Estimated bytes per device on the config's mesh, the roles of its axes read from parallel.rules:
  fp32 params, grads (twice with accumulation) and AdamW moments split as a matrix's two axes are
  ("embed" times "heads": fsdp x tensor by default, replicated over data); activations of one
  microbatch under the configured remat policy, its rows split as "batch" (data x fsdp by default),
  heads, FFN hidden and vocabulary as "act_heads", "mlp" and "vocab"."""
  m, t = config.model, config.training
  length = config.data.max_length
  split = axis_splits(config, num_devices)
  tokens_per_device = t.batch_size * length / min(split.get("batch", 1), t.batch_size)
  per_layer = _activation_bytes_per_token_layer(m, length, split.get("act_heads", 1), split.get("mlp", 1))
  saved = per_layer[m.remat] * m.num_layers
  one_layer_live = per_layer["none"]  # the layer being recomputed / differentiated
  logits = 2 * 4 * m.vocab_size / split.get("vocab", 1)  # float32 logits and their gradient, vocab split
  activations = tokens_per_device * (saved + one_layer_live + logits)
  shard = 1.0 / (split.get("embed", 1) * split.get("heads", 1))
  # With accumulation the step holds the float32 gradient sum beside one microbatch's gradients.
  grad_buffers = 2 if t.grad_accum_steps > 1 else 1
  mu_bytes = 2.0 if t.mu_dtype == "bfloat16" else 4.0
  out = {
      "params": 4.0 * num_params * shard,
      "grads": 4.0 * grad_buffers * num_params * shard,
      "optimizer": (mu_bytes + 4.0) * num_params * shard,
      "activations": activations,
  }
  out["total"] = sum(out.values())
  return out


def variant_sizes(config: ml_collections.ConfigDict) -> dict[str, dict[str, float]]:
  """Parameters and training FLOPs per token of every named variant (model/variants.py) at this config's
  shape (d, layers, heads, vocabulary, window): what QTG is compared with."""
  from neon_qtg_jax.model.variants import VARIANTS, variant_config  # pylint: disable=import-outside-toplevel
  out = {}
  for name in VARIANTS:
    variant = variant_config(config, name)
    out[name] = {"params": sum(parameter_breakdown(variant.model).values()),
                 "train_flops_per_token": flops_per_token(variant)["train"]}
  return out


def summarize(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything --mode=info reports, as plain JSON-able values."""
  m, t = config.model, config.training
  breakdown = parameter_breakdown(m)
  total = sum(breakdown.values())
  num_devices = config.info.num_devices
  flops = flops_per_token(config)
  tokens_per_step = t.batch_size * t.grad_accum_steps * config.data.max_length
  memory = training_memory(config, total, num_devices)
  estimates = {}
  fraction = targets.gpu_allocator_fraction()
  for name, spec in ACCELERATORS.items():
    peak = spec["peak_bf16"] if m.dtype == "bfloat16" else spec["peak_bf16"] / 2
    step_seconds = flops["train"] * tokens_per_step / (num_devices * peak * config.info.mfu)
    estimates[name] = {
        "peak_flops_per_device": peak,
        "step_seconds": step_seconds,
        "days_for_total_steps": step_seconds * t.total_steps / 86400,
        "tokens_per_second": tokens_per_step / step_seconds,
        "memory_fits": memory["total"] <= fraction * spec["memory"],
        "device_memory_bytes": spec["memory"],
        "allocator_fraction": fraction,  # XLA_PYTHON_CLIENT_MEM_FRACTION: the share XLA may allocate
    }
  return {
      "name": config.name,
      "params": total,
      "params_breakdown": breakdown,
      "params_per_block": spec_block_parameters(m),
      "num_devices": num_devices,
      "mesh": mesh_sizes(config, num_devices),
      "tokens_per_step": tokens_per_step,
      "flops_per_token": flops,
      "flops_per_step": flops["train"] * tokens_per_step,
      "memory_bytes_per_device": memory,
      "remat": m.remat,
      "dtype": m.dtype,
      "mfu_assumed": config.info.mfu,
      "estimates": estimates,
      "variants": variant_sizes(config),
  }


def _gib(x: float) -> str:
  return f"{x / 2**30:,.2f} GiB"


def format_text(info: dict[str, Any]) -> str:
  total = info["params"]
  lines = [f"{info['name']}: {total:,} parameters ({total:.3e})", "", "component                      parameters      share"]
  for name, count in info["params_breakdown"].items():
    lines.append(f"  {name:<26} {count:>15,} {100 * count / total:>8.2f}%")
  lines.append(f"  per block (spec: 28 d^2 + norms + gamma): {info['params_per_block']:,}")
  mesh = " x ".join(f"{axis}={size}" for axis, size in info["mesh"].items())
  lines += ["", f"training memory per device ({info['num_devices']} device(s), mesh {mesh}, remat={info['remat']}, "
            f"fp32 params + AdamW, estimate):"]
  for name, value in info["memory_bytes_per_device"].items():
    lines.append(f"  {name:<12} {_gib(value):>14}")
  f = info["flops_per_token"]
  lines += ["", "FLOPs per token (causal attention, forward unless noted):"]
  for name in ("matmuls", "attention", "topofilter", "forward", "train"):
    lines.append(f"  {name:<12} {f[name]:.4e}")
  lines.append(f"  per step     {info['flops_per_step']:.4e}  ({info['tokens_per_step']:,} tokens per step)")
  lines += ["", f"estimated at {100 * info['mfu_assumed']:.0f}% MFU ({info['dtype']} compute):"]
  for name, est in info["estimates"].items():
    fits = "fits" if est["memory_fits"] else "does not fit"
    usable = est["allocator_fraction"] * est["device_memory_bytes"]
    lines.append(f"  {name}: {est['step_seconds']:.3f} s/step, {est['tokens_per_second']:,.0f} tokens/s, "
                 f"{est['days_for_total_steps']:.1f} days for total_steps; memory {fits} in "
                 f"{_gib(usable)} ({est['allocator_fraction']:.0%} of {_gib(est['device_memory_bytes'])} = "
                 f"{est['device_memory_bytes'] / 1e9:.1f} GB)")
  lines.append("  (estimates; --mode=memory_report --target=h200:N gives XLA's own figure for the H200)")
  lines += ["", "the named variants at this shape (neon_qtg_jax/model/variants.py; qtg is QTG's defaults, not",
            "necessarily this config):", "  variant      parameters   train FLOPs/token"]
  for name, sizes in info["variants"].items():
    lines.append(f"  {name:<10} {sizes['params']:>13,} {sizes['train_flops_per_token']:>18.4e}")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, args) -> int:
  info = summarize(config)
  if args.info_format == "json":
    print(json.dumps(info))
  else:
    print(format_text(info))
  return 0

