"""CPU (or any backend) benchmark: blockwise kernels against the references, in one process.

For Fisher-Rao attention, dot-product attention and the TopoFilter persistence it times jitted
forward+backward passes and reads XLA's temporary bytes from the compiled memory analysis,
and checks values and gradients against the reference on the same random inputs.

  python tools/bench_kernels.py                      # L=1024, B=2, H=4, hd=64, float32, 2d=128
  python tools/bench_kernels.py --lengths=256,512,1024,2048 --plot=bench_kernels.png --output=bench.json

With several lengths, --plot draws time and temporary memory against L (log-log) as a PNG.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import neon_qtg_jax  # noqa: F401  first: without a GPU driver it keeps jax on the CPU
import jax
import jax.numpy as jnp

from neon_qtg_jax.ops import blockwise_geo, blockwise_topo, geo_attention, measure, topo_filter


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", default="1024", help="comma-separated sequence lengths")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--topo_width", type=int, default=128, help="2d of the TopoFilter states (tiny config: 128)")
  p.add_argument("--topo_k", type=int, default=1)
  p.add_argument("--block_q", type=int, default=128)
  p.add_argument("--block_k", type=int, default=128)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--output", default="", help="also write the rows as JSON here")
  p.add_argument("--plot", default="", help="PNG of time and memory against length")
  return p.parse_args(argv)


def bench_pair(name, length, reference, blockwise, args, num_grads, repeats):
  """One table row: reference and blockwise fwd+bwd timed and measured on the same inputs."""
  ref_fn, fast_fn = (jax.jit(measure.loss_and_grads(f, num_grads)) for f in (reference, blockwise))
  error = measure.max_relative_error(fast_fn(*args), ref_fn(*args))
  ref_time = measure.time_compiled(ref_fn, *args, repeats=repeats)
  fast_time = measure.time_compiled(fast_fn, *args, repeats=repeats)
  ref_bytes = measure.temp_bytes(ref_fn, *args)
  fast_bytes = measure.temp_bytes(fast_fn, *args)
  row = {
      "op": name, "length": length, "ref_ms": 1e3 * ref_time.median_s, "blockwise_ms": 1e3 * fast_time.median_s,
      "time_ratio": fast_time.median_s / ref_time.median_s,
      "ref_temp_mib": ref_bytes / 2**20, "blockwise_temp_mib": fast_bytes / 2**20,
      "temp_ratio": fast_bytes / ref_bytes, "max_rel_err": error,
  }
  print(f"{name:<6} {length:>5} {row['ref_ms']:9.1f} {row['blockwise_ms']:9.1f} {row['time_ratio']:7.3f} "
        f"{row['ref_temp_mib']:10.1f} {row['blockwise_temp_mib']:10.2f} {row['temp_ratio']:7.4f} "
        f"{error:9.2e}", flush=True)
  return row


def bench_length(a: argparse.Namespace, length: int) -> list[dict]:
  """The three rows (geo, dot, topo) at one sequence length."""
  dtype = jnp.dtype(a.dtype)
  shape = (a.batch, length, a.heads, a.head_dim)
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  q, k, v, cotangent = (jax.random.normal(key, shape) for key in keys[:4])
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  gamma = jnp.linspace(1.0, 8.0, a.heads, dtype=jnp.float32)
  psi = jax.random.normal(keys[4], (a.batch, length, a.topo_width), jnp.float32)
  topo_cotangent = jax.random.normal(keys[5], (a.batch, length), jnp.float32)
  blocks = dict(block_q=a.block_q, block_k=a.block_k)
  return [
      bench_pair("geo", length, geo_attention.geo_attention_reference,
                 functools.partial(blockwise_geo.geo_attention_blockwise, **blocks),
                 (q, k, v, gamma, cotangent), 4, a.repeats),
      bench_pair("dot", length, geo_attention.dot_attention_reference,
                 functools.partial(blockwise_geo.dot_attention_blockwise, **blocks),
                 (q, k, v, cotangent), 3, a.repeats),
      bench_pair("topo", length, functools.partial(topo_filter.topo_persistence_reference, k=a.topo_k),
                 functools.partial(blockwise_topo.topo_persistence_blockwise, k=a.topo_k, **blocks),
                 (psi, topo_cotangent), 1, a.repeats),
  ]


def plot(rows: list[dict], title: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
  for op, color in (("geo", "tab:blue"), ("dot", "tab:orange"), ("topo", "tab:green")):
    mine = [r for r in rows if r["op"] == op]
    lengths = [r["length"] for r in mine]
    for ax, ref_key, fast_key in ((ax_time, "ref_ms", "blockwise_ms"), (ax_mem, "ref_temp_mib", "blockwise_temp_mib")):
      ax.plot(lengths, [r[ref_key] for r in mine], "--o", color=color, label=f"{op} reference")
      ax.plot(lengths, [r[fast_key] for r in mine], "-o", color=color, label=f"{op} blockwise")
  for ax, label in ((ax_time, "fwd+bwd time (ms)"), (ax_mem, "XLA temporary memory (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  ax_mem.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  a = parse_args(argv)
  lengths = [int(x) for x in a.lengths.split(",")]
  header = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  jax {jax.__version__}  backend "
            f"{jax.default_backend()} ({jax.devices()[0].device_kind}, {platform.machine()})")
  setup = (f"fwd+bwd, B={a.batch} H={a.heads} hd={a.head_dim} {a.dtype}, topo 2d={a.topo_width} k={a.topo_k}, "
           f"blocks {a.block_q}x{a.block_k}, median of {a.repeats}")
  print(header)
  print(setup)
  print(f"{'op':<6} {'L':>5} {'ref_ms':>9} {'block_ms':>9} {'t_ratio':>7} {'ref_MiB':>10} {'block_MiB':>10} "
        f"{'m_ratio':>7} {'rel_err':>9}")
  rows = [r for length in lengths for r in bench_length(a, length)]
  print("t_ratio, m_ratio: blockwise / reference (time, XLA temporary bytes); rel_err: max |diff| / max |ref| "
        "over output and gradients")
  if a.output:
    Path(a.output).write_text(json.dumps({"header": header, "args": vars(a), "rows": rows}, indent=2))
    print(f"wrote {a.output}")
  if a.plot:
    plot(rows, f"{header}\n{setup}", a.plot)
    print(f"wrote {a.plot}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
