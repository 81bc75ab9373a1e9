"""Child process of test_train_resume_memory.py: start fresh, or save and resume, and print peak RSS.

python tests/resume_memory_child.py {fresh|save|resume} WORKDIR
prints one JSON line: {"peak_rss_bytes": ..., "checksum": ...}. Each mode runs in its own process
so ru_maxrss is that mode's peak alone.
"""

import json
import os
import resource
import sys
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

from neon_qtg_jax import parallel
from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.checkpoint import checkpointer as checkpointing
from neon_qtg_jax.training import resume
from neon_qtg_jax.training import train_step as ts


def params_dominated_config():
  """About 60M parameters (0.7 GB of float32 state) in two layers: the state, not the code, sets the peak."""
  c = default_config()
  c.model.update(vocab_size=16384, embed_dim=512, num_layers=2, num_heads=4, max_seq_len=64)
  c.data.update(max_length=64, stride=32)
  c.eval.update(max_length=64, stride=32)
  return validate(c)


def checksum(state: ts.TrainState) -> float:
  return float(sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves((state.params, state.opt_state))))


def main(mode: str, workdir: str) -> None:
  config = params_dominated_config()
  sharding = parallel.ShardingConfig.from_config(config.parallel)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)

  def init() -> ts.TrainState:
    return ts.create_train_state(config, jax.random.PRNGKey(config.seed), sharding)[1]

  if mode == "save":  # a state that differs from a fresh one, so the test can tell a restore from an init
    state = init()
    state = state.replace(step=state.step + 3, opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
    checkpointer.save(3, params=state.params, opt_state=state.opt_state, meta=resume.Progress().meta(state),
                      config=config)
    checkpointer.wait()
  else:
    if mode == "fresh":
      checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "empty"), keep=1)
    args = types.SimpleNamespace(resume_from="")
    state, _ = resume.restore_or_init(config, args, checkpointer, ts.sharded_abstract_state(config, sharding), None,
                                       sharding, init)
    jax.block_until_ready(state)
  checkpointer.close()
  print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    "checksum": checksum(state), "step": int(state.step)}))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
