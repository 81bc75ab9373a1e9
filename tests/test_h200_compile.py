"""Compiling for the H200 without one: XLA's GPU compiler through the cuda12 extra's compile-only client.

A change that breaks GPU compilation or sharding fails here on a CPU-only machine.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from neon_qtg_jax import parallel
from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.parallel import targets
from neon_qtg_jax.training import memory_report, programs
from neon_qtg_jax.training import train_step as ts
from optional import needs

needs_cuda_plugin = needs("jax-cuda12-plugin", extra="cuda12", module="jax_plugins.xla_cuda12")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpu_config():
  """The tiny model laid out as the 7b runs: bf16 compute, scanned layers, block remat, accumulation."""
  c = default_config()
  c.model.update(dtype="bfloat16", scan_layers=True, remat="block", attention_impl="blockwise", num_layers=2)
  c.training.update(batch_size=8, grad_accum_steps=2)
  return validate(c)


def test_topology_strings_and_bad_targets():
  assert [targets.topology(n) for n in (1, 8, 32)] == ["1x1x1", "1x1x8", "1x4x8"]
  for bad in ("h200:12", "h200:0", "tpu:1", "h200:x"):
    with pytest.raises(targets.TargetError, match="--target"):
      targets.parse(bad)


def test_without_the_cuda_plugin_the_error_names_the_extra(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "xla_cuda12" in name else real(name, *a))
  with pytest.raises(targets.TargetError, match=r'pip install -e "\.\[cuda12\]"'):
    targets.compile_target("h200:1")


@needs_cuda_plugin
@pytest.mark.parametrize("spec", ["h200:1", "h200:8"])
def test_tiny_train_eval_and_decode_steps_compile_for_h200(spec):
  config = tiny_gpu_config()
  target = targets.compile_target(spec)
  assert target.platform == "gpu" and target.device_kind == "NVIDIA H200" and len(target.devices) == int(spec[-1])
  assert target.device_memory_bytes == 143771 * 2**20  # 140.4 GiB, what the driver reports for "141 GB"
  sharding = parallel.ShardingConfig.from_config(config.parallel, list(target.devices))
  train = memory_report.compile_report(lambda: programs.lower_train_step(config, sharding), target)
  decode = memory_report.compile_report(lambda: programs.lower_decode_step(config, sharding, 1, 128), target)
  evaluate = memory_report.compile_report(lambda: programs.lower_eval_step(config, sharding), target)
  assert train.fits and decode.fits and evaluate.fits and train.temporaries > 0
  state_bytes = sum(x.size * x.dtype.itemsize for x in
                    jax.tree.leaves(ts.abstract_train_state(config)))
  # FSDP: each of the N devices holds about 1/N of the parameters and AdamW state.
  assert train.arguments < 1.25 * state_bytes / len(target.devices) + 2**20
  assert train.aliased >= 0.9 * train.arguments - 2**20  # the donated state is updated in place


@needs_cuda_plugin
@pytest.mark.slow  # ~1-2 min: the 7b train step and its init program compiled for sm_90
def test_7b_fits_on_one_h200_with_headroom_and_info_agrees():
  result = subprocess.run([sys.executable, "launch.py", "--config=configs/neon_qtg_7b.py", "--mode=memory_test",
                           "--target=h200:1", "--info_format=json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["fits"] and report["target"] == "h200:1" and report["num_devices"] == 1
  assert report["peak_bytes"] <= 0.85 * report["device_memory_bytes"]
  assert report["init_peak_bytes"] <= report["peak_bytes"]
  assert abs(report["estimate_bytes"] / report["peak_bytes"] - 1) <= 0.10


@needs_cuda_plugin
@pytest.mark.parametrize("kind, kernel", [("geo", "__gpu$xla.gpu.triton"), ("dot", "__cudnn$fmha")])
def test_pallas_attention_follows_the_compile_target_not_this_host(kind, kernel):
  """Under a GPU target `pallas` lowers to the Pallas (Triton) kernel or cuDNN; on this CPU host it cannot."""
  from jax.sharding import NamedSharding, PartitionSpec
  from neon_qtg_jax.model import attention as attention_kinds
  from neon_qtg_jax.ops import dispatch

  target = targets.compile_target("h200:1")
  mesh = parallel.make_mesh(default_config().parallel, devices=list(target.devices))
  x = jax.ShapeDtypeStruct((2, 256, 4, 64), jax.numpy.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
  gamma = jax.ShapeDtypeStruct((4,), jax.numpy.float32, sharding=NamedSharding(mesh, PartitionSpec()))

  def attend(q, k, v, g):
    return attention_kinds.get(kind).attend(q, k, v, g, impl="pallas", block_q=128, block_k=128)
  with dispatch.target_platform(target.platform):
    on_target = jax.jit(attend).lower(x, x, x, gamma).as_text()
  on_host = jax.jit(attend).lower(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, x, x, gamma)]).as_text()
  assert kernel in on_target and kernel not in on_host


def test_int8_weights_shrink_the_compiled_decode_step_and_the_tool_takes_config_overrides(tmp_path):
  """tools/h200_compile.py --config.inference.weight_dtype=int8: the decode program's parameters are int8."""
  out = tmp_path / "int8.json"
  args = ["--config=configs/neon_qtg_tiny.py", "--config.model.dtype=bfloat16", "--programs=decode",
          "--context=128"]
  runs = {}
  for weights in ("bfloat16", "int8"):
    result = subprocess.run([sys.executable, "tools/h200_compile.py", *args, f"--config.inference.weight_dtype={weights}",
                             f"--output={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs[weights] = json.loads(out.read_text())
  assert runs["int8"]["weight_dtype"] == "int8" and [r["program"] for r in runs["int8"]["programs"]] == [
      "decode step (batch 1, 128 slots)"]
  bf16, int8 = (runs[w]["programs"][0]["arguments_bytes"] for w in ("bfloat16", "int8"))
  assert int8 < 0.75 * bf16
  bad = subprocess.run([sys.executable, "tools/h200_compile.py", *args, "--config.inference.weight_dtype=int4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "inference.weight_dtype" in bad.stderr
