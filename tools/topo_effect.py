"""How much the TopoFilter changes what attention selects, under each `model.topo_apply`.

  python tools/topo_effect.py [--config configs/neon_qtg_tiny.py] [--length 64] [--rows 4] [model.field=value ...]

Builds the config's model (freshly initialised, seed 0) and records its attention probabilities on
random tokens, then records them again with only the filter's weights w_t changed (threshold 0.1 -> 0,
tau 1 -> 0.1, no filter: w = 1) and prints the largest change of a probability, in the first layer (same
q, k projections: only w differs) and over all layers. Under `inputs` with the normed sphere map the
first layer's change is rounding and the eps guard of rms(q) (docs/MODEL.md, "TopoFilter").
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import neon_qtg_jax  # noqa: E402,F401  first: without a GPU driver it keeps jax on the CPU
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from neon_qtg_jax.config import TOPO_APPLY  # noqa: E402
from neon_qtg_jax.model import QTGModel  # noqa: E402

CHANGES = {"threshold 0.1 -> 0": {"persistence_threshold": 0.0}, "tau 1 -> 0.1": {"tau": 0.1},
           "no filter (w = 1)": {"topofilter": False}}


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/neon_qtg_tiny.py")
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--rows", type=int, default=4)
  parser.add_argument("overrides", nargs="*", help="model.field=value (Python literal or string)")
  args = parser.parse_args()
  base = load_config(args.config).model
  for item in args.overrides:
    key, value = item.split("=", 1)
    field = key.removeprefix("model.")
    base[field] = type(base[field])(value) if not isinstance(base[field], bool) else value == "True"
  tokens = jax.random.randint(jax.random.key(1), (args.rows, args.length), 0, base.vocab_size, dtype=jnp.int32)

  def record(**overrides):
    m = base.copy_and_resolve_references()
    m.update(overrides)
    return QTGModel(m, rngs=nnx.Rngs(0)).recorded(tokens)

  for apply in TOPO_APPLY:
    ref = record(topo_apply=apply)
    w = np.asarray(ref["w"][0])
    print(f"topo_apply={apply}: first layer w quantiles (5/50/95%) {np.quantile(w, [0.05, 0.5, 0.95]).round(3)}")
    for name, overrides in CHANGES.items():
      probs = record(topo_apply=apply, **overrides)["attention"]
      change = np.abs(np.asarray(probs) - np.asarray(ref["attention"]))
      print(f"  {name:20s} max |dP| first layer {change[0].max():.2e}, all layers {change.max():.2e}")


if __name__ == "__main__":
  main()
