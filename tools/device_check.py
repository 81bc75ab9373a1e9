"""One-command GPU check of the fast path: correctness, attention TFLOP/s, 7b training and decoding.

Each section runs in its own subprocess (a fresh peak-memory counter, and an out-of-memory
error or a crash costs one section, not the run); the parent prints one table and writes it
as Markdown and JSON. Tokens are synthetic (random ids), so no prepared data is needed, and
the imports are jax, flax, optax, numpy, ml_collections and psutil only.

  python tools/device_check.py --output=device_check.md          # on one H100/H200, < 8 min
  python tools/device_check.py --smoke --output=/tmp/smoke.md    # tiny shapes on CPU, end to end

Sections (--sections=a,b): correctness (each fast path against its reference), attention
(Fisher-Rao fwd+bwd TFLOP/s against cuDNN dot-product attention at B=4 L=2048 H=24 hd=128
bf16), train (7b train step tokens/s, MFU, peak memory; on a GPU too small for 7b, the most
layers that fit), decode (batch-1 cached decoding of the 7b shape at 2048 context).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("correctness", "attention", "train", "decode")
SECTION_TIMEOUT_S = {"correctness": 100, "attention": 85, "train": 185, "decode": 90}  # 460 s in all
TARGETS = {  # the targets, checked where a row names one
    "geo_vs_cudnn": 0.7, "mfu": 0.5, "decode_tokens_per_s": 250.0, "decode_peak_gb": 15.0,
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (Pallas in interpret mode)")
  p.add_argument("--sections", default=",".join(SECTIONS))
  p.add_argument("--output", default="device_check.md", help="Markdown table; a .json twin is written beside it")
  p.add_argument("--train_impl", default="pallas", help="model.attention_impl for the train section")
  p.add_argument("--train_accum", type=int, default=1,
                 help="microbatches per timed step (7b: 4 x 2048 each); above 1 the step also holds a float32 "
                      "gradient sum, 27 GB more at 7b")
  p.add_argument("--section", default="", help=argparse.SUPPRESS)   # child mode
  p.add_argument("--result", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def row(section: str, item: str, value: float | None, unit: str, *, target: float | None = None,
        higher_is_better: bool = True, note: str = "", ok: bool | None = None) -> dict:
  if ok is None and target is not None and value is not None:
    ok = value >= target if higher_is_better else value <= target
  return {"section": section, "item": item, "value": value, "unit": unit, "target": target, "ok": ok, "note": note}


def _load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _on_gpu() -> bool:
  import jax
  return jax.default_backend() == "gpu"


def _peak_gb() -> tuple[float, str]:
  """Peak device memory of this process in GB (1e9 bytes); on CPU (no device counter) the host's max RSS."""
  import resource
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 1e9, "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "host max RSS (no device counter)"


def section_correctness(smoke: bool) -> list[dict]:
  """Every fast path against its reference on random inputs with a ragged length: values and gradients."""
  import jax
  import jax.numpy as jnp
  jax.config.update("jax_default_matmul_precision", "highest")  # float32 references without TF32 rounding
  from neon_qtg_jax.ops import blockwise_geo, blockwise_topo, geo_attention, measure, pallas_geo, topo_filter

  batch, length, heads, head_dim = (1, 80, 2, 16) if smoke else (2, 1000, 4, 128)
  blocks = dict(block_q=32, block_k=32) if smoke else dict(block_q=128, block_k=64)
  gamma = jnp.linspace(1.0, 30.0, heads)
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  shape = (batch, length, heads, head_dim)
  q32, k32, v32, cot = (2.0 * jax.random.normal(key, shape) for key in keys[:4])
  rows = []

  def compare(item, fast, ref, args, num_grads, tol):
    try:
      got = jax.jit(measure.loss_and_grads(fast, num_grads))(*args)
      want = jax.jit(measure.loss_and_grads(ref, num_grads))(*args)
      err = measure.max_relative_error(got, want)
      rows.append(row("correctness", item, err, "max rel err", target=tol, higher_is_better=False))
    except Exception as e:  # a failing path is a row, not the end of the check
      rows.append(row("correctness", item, None, "", ok=False, note=f"{type(e).__name__}: {str(e)[:200]}"))

  interpret = not _on_gpu()
  pallas = functools.partial(pallas_geo.geo_attention_pallas, interpret=interpret, **blocks)
  for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)):
    name = jnp.dtype(dtype).name
    q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
    compare(f"geo blockwise {name}", functools.partial(blockwise_geo.geo_attention_blockwise, **blocks),
            geo_attention.geo_attention_reference, (q, k, v, gamma, cot), 4, tol)
    compare(f"geo pallas{' (interpret)' if interpret else ''} {name}", pallas,
            geo_attention.geo_attention_reference, (q, k, v, gamma, cot), 4, tol)
    compare(f"dot blockwise {name}", functools.partial(blockwise_geo.dot_attention_blockwise, **blocks),
            geo_attention.dot_attention_reference, (q, k, v, cot), 3, tol)
    if _on_gpu() and dtype == jnp.bfloat16:
      cudnn = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
      compare(f"dot cudnn {name}", cudnn, geo_attention.dot_attention_reference, (q, k, v, cot), 3, tol)
  psi = jax.random.normal(keys[4], (batch, length, 2 * heads * head_dim))
  psi_cot = jax.random.normal(keys[3], (batch, length))
  for topo_k in (1, 3):
    compare(f"topo blockwise k={topo_k} float32",
            functools.partial(blockwise_topo.topo_persistence_blockwise, k=topo_k, **blocks),
            functools.partial(topo_filter.topo_persistence_reference, k=topo_k), (psi, psi_cot), 1, 1e-4)
  return rows


def section_attention(smoke: bool) -> list[dict]:
  """Fisher-Rao attention fwd+bwd TFLOP/s against cuDNN's fused dot-product attention, same shapes."""
  import jax
  import jax.numpy as jnp
  from neon_qtg_jax.ops import blockwise_geo, geo_attention, measure, pallas_geo

  batch, length, heads, head_dim = (1, 256, 2, 32) if smoke else (4, 2048, 24, 128)
  dtype = jnp.bfloat16
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  shape = (batch, length, heads, head_dim)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
  cot = jax.random.normal(keys[3], shape, jnp.float32)
  gamma = jnp.full((heads,), 8.0)
  flops = measure.attention_flops(batch, length, heads, head_dim)
  gpu = _on_gpu()
  dot_impl = "cudnn" if gpu else "xla"  # cuDNN exists only on the GPU; the smoke run times XLA's instead
  candidates = {
      f"dot {dot_impl}": (functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=dot_impl),
                          (q, k, v, cot), 3),
      "geo pallas" + ("" if gpu else " (interpret)"):
          (functools.partial(pallas_geo.geo_attention_pallas, interpret=not gpu), (q, k, v, gamma, cot), 4),
      "geo blockwise": (blockwise_geo.geo_attention_blockwise, (q, k, v, gamma, cot), 4),
      "geo reference": (geo_attention.geo_attention_reference, (q, k, v, gamma, cot), 4),
  }
  rows, rates = [], {}
  for name, (attn, args, num_grads) in candidates.items():
    try:
      fn = jax.jit(measure.loss_and_grads(attn, num_grads))
      timing = measure.time_compiled(fn, *args, repeats=2 if smoke else 10)
      rates[name] = flops / timing.median_s / 1e12
      rows.append(row("attention", f"{name} fwd+bwd", rates[name], "TFLOP/s",
                      note=f"{1e3 * timing.median_s:.2f} ms, B={batch} L={length} H={heads} hd={head_dim} bf16"))
    except Exception as e:
      rows.append(row("attention", f"{name} fwd+bwd", None, "TFLOP/s", ok=False,
                      note=f"{type(e).__name__}: {str(e)[:200]}"))
  baseline = rates.get(f"dot {dot_impl}")
  for name in ("geo pallas" + ("" if gpu else " (interpret)"), "geo blockwise"):
    if baseline and name in rates:
      rows.append(row("attention", f"{name} / dot {dot_impl}", rates[name] / baseline, "ratio",
                      target=TARGETS["geo_vs_cudnn"] if gpu else None))
  return rows


def _train_config(smoke: bool, impl: str, accum: int):
  from neon_qtg_jax import info
  from neon_qtg_jax.config import default_config, validate
  from neon_qtg_jax.parallel import targets

  if smoke:
    config = default_config()
    config.training.batch_size, config.training.grad_accum_steps = 4, accum
    config.model.attention_impl = impl
    return validate(config), ""
  config = _load_config("neon_qtg_7b")
  config.training.grad_accum_steps = accum
  config.model.attention_impl = impl
  capacity = targets.local_target().device_bytes  # the allocator's limit
  note = ""
  for layers in (24, 20, 16, 12, 8, 4):  # the most layers the analytic estimate fits in 90% of memory
    config.model.num_layers = layers
    estimate = info.training_memory(config, sum(info.parameter_breakdown(config.model).values()))["total"]
    if estimate <= 0.9 * capacity:
      break
  if config.model.num_layers != 24:
    note = f"7b with num_layers={config.model.num_layers} (24 do not fit {capacity / 1e9:.0f} GB)"
  return validate(config), note


def section_train(smoke: bool, impl: str, accum: int) -> list[dict]:
  """Tokens/s, MFU and peak memory of the real jit train step on synthetic tokens."""
  import jax
  from neon_qtg_jax import info, parallel
  from neon_qtg_jax.training import train_step as ts

  config, note = _train_config(smoke, impl, accum)
  sharding = parallel.ShardingConfig.from_config(config.parallel)
  graphdef, state = ts.create_train_state(config, jax.random.PRNGKey(0), sharding)
  step = ts.make_train_step(config, graphdef, sharding)
  t, m = config.training, config.model
  shape = (t.batch_size * t.grad_accum_steps, config.data.max_length + 1)
  tokens = jax.random.randint(jax.random.PRNGKey(1), shape, 0, m.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  began = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - began
  steps = 2 if smoke else 4
  began = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - began) / steps
  tokens_per_s = ts.tokens_per_step(config) / seconds
  device = jax.devices()[0]
  peak = info.peak_flops(device.device_kind, m.dtype)
  resolved = m.attention_impl if _on_gpu() or m.attention_impl != "pallas" else "pallas -> blockwise off GPU"
  shape_note = (f"{config.name} L={config.data.max_length} {t.grad_accum_steps}x{t.batch_size}, impl {resolved}, "
                f"remat {m.remat}, {seconds:.2f} s/step, first step {compile_s:.0f} s, loss {float(metrics['loss']):.3f}")
  rows = [row("train", "tokens/s", tokens_per_s, "tokens/s", note="; ".join(x for x in (note, shape_note) if x))]
  if peak:
    mfu = tokens_per_s * info.flops_per_token(config)["train"] / peak
    rows.append(row("train", "MFU", mfu, "fraction", target=TARGETS["mfu"],
                    note=f"model FLOPs (remat recompute not counted) / {peak / 1e12:.0f} TFLOP/s peak"))
  peak_gb, source = _peak_gb()
  rows.append(row("train", "peak memory", peak_gb, "GB", note=source))
  return rows


def _synthetic_params(model_cfg, dtype):
  """Parameters built leaf by leaf directly in `dtype` (no float32 copy ever alive): random weights,
  unit norm scales, zero biases, gamma at its initial value. Decoding speed and memory do not
  depend on the values."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from neon_qtg_jax.model.qtg import QTGModel, inverse_softplus

  abstract = nnx.eval_shape(lambda: QTGModel(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  values = []
  for i, (path, leaf) in enumerate(leaves):
    name = [str(p.key) for p in path if hasattr(p, "key")][-1]  # the parameter's own name
    if name == "scale":
      value = jnp.ones(leaf.shape, dtype)
    elif name == "bias":
      value = jnp.zeros(leaf.shape, dtype)
    elif name == "gamma_raw":
      value = jnp.full(leaf.shape, inverse_softplus(model_cfg.gamma), dtype)
    elif jnp.issubdtype(leaf.dtype, jnp.floating):
      value = jax.jit(lambda key, s=leaf.shape: model_cfg.init_std * jax.random.normal(key, s, dtype))(
          jax.random.PRNGKey(i))
    else:  # integer state (e.g. RNG counters) keeps its dtype
      value = jnp.zeros(leaf.shape, leaf.dtype)
    values.append(value)
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))


def section_decode(smoke: bool) -> list[dict]:
  """Batch-1 cached decoding of the 7b shape up to its 2048-token context: tokens/s and peak memory."""
  import jax
  import jax.numpy as jnp
  from neon_qtg_jax import parallel
  from neon_qtg_jax.config import default_config
  from neon_qtg_jax.inference.sampling import SamplingParams, continue_prompts_with_stats

  config = default_config() if smoke else _load_config("neon_qtg_7b")
  m = config.model
  new_tokens = 32 if smoke else 256
  prompt_len = m.max_seq_len - new_tokens
  model = _synthetic_params(m, jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32)
  prompt = jax.random.randint(jax.random.PRNGKey(0), (prompt_len,), 0, m.vocab_size).tolist()
  greedy = SamplingParams(temperature=0.0)
  sharding = parallel.ShardingConfig.from_config(config.parallel)
  continue_prompts_with_stats(model, [prompt], sampling_cfg=greedy, max_new_tokens=new_tokens, eos_id=None, seed=0,
                              sharding=sharding)
  _, stats = continue_prompts_with_stats(model, [prompt], sampling_cfg=greedy, max_new_tokens=new_tokens, eos_id=None,
                                         seed=0, sharding=sharding)
  note = (f"{config.name}, params stored in {m.dtype}, prompt {prompt_len} + {new_tokens} new tokens, "
          f"prefill {stats.prefill_seconds:.2f} s")
  peak_gb, source = _peak_gb()
  return [
      row("decode", "batch-1 decode", stats.decode_tokens_per_second, "tokens/s",
          target=None if smoke else TARGETS["decode_tokens_per_s"], note=note),
      row("decode", "peak memory", peak_gb, "GB", target=None if smoke else TARGETS["decode_peak_gb"],
          higher_is_better=False, note=f"{source}: parameters, cache, prefill and decode"),
  ]


def run_section(args: argparse.Namespace) -> None:
  try:
    if args.section == "correctness":
      rows = section_correctness(args.smoke)
    elif args.section == "attention":
      rows = section_attention(args.smoke)
    elif args.section == "train":
      rows = section_train(args.smoke, args.train_impl, args.train_accum)
    else:
      rows = section_decode(args.smoke)
  except Exception as e:
    traceback.print_exc()
    rows = [row(args.section, "section", None, "", ok=False, note=f"{type(e).__name__}: {str(e)[:300]}")]
  Path(args.result).write_text(json.dumps(rows))


def _fmt(value: float | None) -> str:
  if value is None:
    return "-"
  return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"


def format_table(rows: list[dict], header: str) -> str:
  lines = [header, "", "| section | item | value | unit | target | ok | note |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    ok = {True: "yes", False: "NO", None: ""}[r["ok"]]
    lines.append(f"| {r['section']} | {r['item']} | {_fmt(r['value'])} | {r['unit']} | {_fmt(r['target'])} | {ok} "
                 f"| {r['note']} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.section:
    run_section(args)
    return 0
  import jax
  device = jax.devices()[0]
  header = (f"device check {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {device.device_kind} "
            f"({jax.default_backend()}), jax {jax.__version__}, {platform.machine()}" + (", SMOKE (tiny shapes)"
                                                                                         if args.smoke else ""))
  print(header, flush=True)
  # JAX takes 75% of GPU memory by default; 7b training needs about 118 GB of the H200's 141.
  child_env = dict(os.environ, PYTHONUNBUFFERED="1")
  child_env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  rows = []
  began = time.perf_counter()
  for section in args.sections.split(","):
    if section not in SECTIONS:
      raise SystemExit(f"--sections: unknown section {section!r}; choose from {SECTIONS}")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
      result = f.name
    command = [sys.executable, __file__, f"--section={section}", f"--result={result}",
               f"--train_impl={args.train_impl}", f"--train_accum={args.train_accum}"] + (["--smoke"] if args.smoke else [])
    start = time.perf_counter()
    timeout = SECTION_TIMEOUT_S[section] * (3 if args.smoke else 1)
    try:
      subprocess.run(command, timeout=timeout, check=False, env=child_env)
      section_rows = json.loads(Path(result).read_text())
    except subprocess.TimeoutExpired:
      section_rows = [row(section, "section", None, "", ok=False, note=f"timed out after {timeout} s")]
    except (OSError, json.JSONDecodeError) as e:
      section_rows = [row(section, "section", None, "", ok=False, note=f"no result ({type(e).__name__}): crashed?")]
    for r in section_rows:
      print(f"  {r['section']:<12} {r['item']:<36} {_fmt(r['value']):>10} {r['unit']:<12} "
            f"{'' if r['ok'] is None else ('ok' if r['ok'] else 'NO'):<3} {r['note']}", flush=True)
    print(f"[{section} done in {time.perf_counter() - start:.0f} s, total {time.perf_counter() - began:.0f} s]",
          flush=True)
    rows += section_rows
  table = format_table(rows, header)
  print("\n" + table)
  out = Path(args.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(table + "\n")
  out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
  print(f"wrote {out} and {out.with_suffix('.json')}")
  return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
