"""What checkpoint verification costs: a save with and without the checksums written at commit, a restore with
and without the checksum and finite checks (checkpoint/integrity.py), page cache warm and dropped.

  python tools/bench_checkpoint_verify.py [--shapes tiny,mid] [--repeats 3]

tiny: configs/neon_qtg_tiny.py's model; mid: d=512, 8 layers, 8 heads, vocab 32000 (125M parameters).
Each figure is the median of --repeats; "cold" drops the step's files from the page cache first
(posix_fadvise DONTNEED after fsync), so the read comes from the disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import neon_qtg_jax  # noqa: E402,F401  first: without a GPU driver it keeps jax on the CPU
import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from neon_qtg_jax.checkpoint import checkpointer as ckpt, integrity  # noqa: E402
from neon_qtg_jax.config import default_config  # noqa: E402
from neon_qtg_jax.model import QTGModel  # noqa: E402

SHAPES = {
    "tiny": {},
    "mid": dict(embed_dim=512, num_layers=8, num_heads=8, vocab_size=32000, max_seq_len=256),
}


def drop_cache(directory: str) -> None:
  for root, _, names in os.walk(directory):
    for name in names:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


class Plain:
  """Turns the verification off: Orbax's own commit, no checksum or finite check."""

  def __enter__(self):
    self.saved = (integrity.verify, integrity.check_finite, integrity.ChecksummedTemporaryPath.finalize)
    integrity.verify = lambda *a, **k: False
    integrity.check_finite = lambda *a, **k: None
    integrity.ChecksummedTemporaryPath.finalize = integrity.atomicity.AtomicRenameTemporaryPath.finalize
    return self

  def __exit__(self, *exc):
    integrity.verify, integrity.check_finite, integrity.ChecksummedTemporaryPath.finalize = self.saved


def bench(shape: str, repeats: int) -> None:
  config = default_config()
  config.model.update(SHAPES[shape])
  params = nnx.state(QTGModel(config.model, rngs=nnx.Rngs(0)), nnx.Param)
  opt_state = optax.adam(1e-3).init(params.to_pure_dict())
  n = sum(x.size for x in jax.tree.leaves(params))
  nbytes = ckpt.checkpoint_nbytes(params, opt_state)
  times: dict[str, list[float]] = {}
  with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
    for r in range(repeats):
      for mode in ("plain", "verified"):
        directory = os.path.join(root, f"{mode}{r}")
        with (Plain() if mode == "plain" else open(os.devnull)):
          checkpointer = ckpt.Checkpointer(directory, keep=1)
          start = time.perf_counter()
          checkpointer.save(1, params=params, opt_state=opt_state, meta={"step": 1}, config=config)
          checkpointer.wait()
          times.setdefault(f"save {mode}", []).append(time.perf_counter() - start)
          for cache in ("warm", "cold"):
            if cache == "cold":
              drop_cache(directory)
            start = time.perf_counter()
            restored = checkpointer.restore(1, params=params, opt_state=opt_state)
            jax.block_until_ready(restored["params"])
            times.setdefault(f"restore {cache} {mode}", []).append(time.perf_counter() - start)
          checkpointer.close()
  print(f"{shape}: {n / 1e6:.2f}M parameters, {nbytes / 2**20:.1f} MiB params + Adam state, "
        f"{jax.devices()[0].platform}, median of {repeats}")
  for what in ("save", "restore warm", "restore cold"):
    plain, verified = statistics.median(times[f"{what} plain"]), statistics.median(times[f"{what} verified"])
    print(f"  {what:13s} plain {plain * 1e3:8.1f} ms  verified {verified * 1e3:8.1f} ms  "
          f"cost {(verified - plain) * 1e3:+8.1f} ms ({verified / plain - 1:+.0%})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="tiny,mid")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  for shape in args.shapes.split(","):
    bench(shape, args.repeats)


if __name__ == "__main__":
  main()
