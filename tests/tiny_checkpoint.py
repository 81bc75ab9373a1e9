"""A small trained checkpoint for the serving and harness tests: a text corpus, its tokenizer, 40 Adam steps."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from neon_qtg_jax.config import default_config
from neon_qtg_jax.data.manifest import Manifest
from neon_qtg_jax.data.prepare import prepare_dataset
from neon_qtg_jax.loss import cross_entropy, target_log_probs
from neon_qtg_jax.model import QTGModel
from neon_qtg_jax.checkpoint.checkpointer import Checkpointer

TEXT = [f"def f{i}(x):\n\treturn x * {i} + {i % 7}" for i in range(60)] + \
       [f"The value {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60)]
STEPS = 40


def make_run(root: pathlib.Path, *, max_seq_len: int = 64):
  """Writes root/corpus.txt, root/data (tokenizer, shards) and root/work (one checkpoint); returns (config, model)."""
  config = default_config()
  (root / "corpus.txt").write_text("\n\n".join(TEXT))
  config.data.update(dict(source="text", paths=str(root / "corpus.txt"), text_split="blank_line",
                          data_dir=str(root / "data"), val_fraction=0.2, max_length=32, stride=16))
  config.model.update(dict(vocab_size=384, embed_dim=32, num_layers=2, num_heads=2, max_seq_len=max_seq_len))
  config.eval.update(dict(max_length=32, stride=16))
  config.training.batch_size = 8
  config.sampling.max_new_tokens = 16
  prepare_dataset(config, progress=False, num_processes=1)
  stream = np.asarray(Manifest.load(config.data.data_dir).split_tokens("train"), np.int32)

  model = QTGModel(config.model, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, inputs, targets):
    def loss_fn(model):
      return cross_entropy(target_log_probs(model(inputs), targets), jnp.ones(targets.shape, bool))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  length = config.data.max_length
  for _ in range(STEPS):
    starts = rng.integers(0, len(stream) - length - 1, config.training.batch_size)
    window = np.stack([stream[s:s + length + 1] for s in starts])
    step(model, optimizer, jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:]))

  params = nnx.state(model, nnx.Param)
  checkpointer = Checkpointer(str(root / "work"), keep=2)
  checkpointer.save(STEPS, params=params, opt_state=optax.adam(1e-3).init(params.to_pure_dict()),
                    meta={"step": STEPS}, config=config, val_loss=1.0)
  checkpointer.manager.wait_until_finished()
  checkpointer.manager.close()
  jax.effects_barrier()
  return config, model
