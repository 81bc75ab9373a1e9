"""tools/analyze.py: the attention weights it draws are the model's, and the pictures get written."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from neon_qtg_jax.analysis import layer_traces, normalized_entropy
from neon_qtg_jax.config import default_config
from neon_qtg_jax.data.prepare import prepare_dataset
from neon_qtg_jax.model import QTGModel
from neon_qtg_jax.checkpoint.checkpointer import Checkpointer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

GPT = dict(attention="dot", topofilter=False, w_psi=False, amplitude_embedding=False)


def small_model(**overrides) -> QTGModel:
  m = default_config().model
  m.update(dict(vocab_size=61, embed_dim=16, num_layers=2, num_heads=2, max_seq_len=32, init_std=0.2))
  m.update(overrides)
  return QTGModel(m, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("overrides", [{}, GPT, {"attention": "cosine"}], ids=["qtg", "gpt", "cosine"])
def test_traced_attention_is_causal_and_is_what_the_layer_computed(overrides):
  model = small_model(**overrides)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61, dtype=jnp.int32)
  traces = layer_traces(model, tokens)
  probs = traces["attention"]
  assert probs.shape == (2, 2, 2, 12, 12)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.triu(probs, k=1) == 0.0)
  # The maps are sown by the layer's own attention: probs @ V is its (fused) output.
  graphdef, state = nnx.split(model.blocks)
  layer = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], state))
  h = model.embed(tokens, jnp.broadcast_to(jnp.arange(12), tokens.shape))
  f, s = layer.filtered_states(h)
  _, _, v = layer.attn.project(f)
  mine = jnp.einsum("bhqk,bkhd->bqhd", probs[0], v).reshape(2, 12, -1)
  np.testing.assert_allclose(mine, layer.attn(f)[0], atol=1e-5)
  np.testing.assert_allclose(traces["s"][0], s, atol=1e-6)
  assert ("gamma" in traces) == ("attention" not in overrides or overrides["attention"] != "dot")
  entropy = normalized_entropy(traces["attention"])
  assert entropy.shape == (2, 2) and np.all((entropy > 0) & (entropy <= 1 + 1e-6))
  uniform = np.tril(np.ones((1, 1, 1, 5, 5))) / np.arange(1, 6)[:, None]
  np.testing.assert_allclose(normalized_entropy(uniform), 1.0)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_recording_leaves_the_logits_unchanged_and_nothing_is_sown_without_it(scan):
  model = small_model(scan_layers=scan)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61, dtype=jnp.int32)
  plain = model(tokens)
  assert not nnx.state(model, nnx.Intermediate)
  recorded = model(tokens, record=True)
  np.testing.assert_allclose(recorded, plain, atol=1e-6)
  sown = nnx.pop(model, nnx.Intermediate)
  assert {"attention", "s", "w", "bc_quantiles"} <= {path[-1] for path, _ in nnx.to_flat_state(sown)}
  assert model.recorded(tokens)["attention"].shape == (2, 2, 2, 12, 12)  # (layers, B, H, L, L)


def test_analyze_writes_the_pictures_and_tensorboard_images(tmp_path):
  import analyze  # tools/analyze.py
  config = default_config()
  text = ([f"def f{i}(x):\n\treturn x * {i} + {i % 7}" for i in range(60)]
          + [f"The value {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60)])
  (tmp_path / "corpus.txt").write_text("\n\n".join(text))
  config.data.update(dict(source="text", paths=str(tmp_path / "corpus.txt"), text_split="blank_line",
                          data_dir=str(tmp_path / "data"), val_fraction=0.2, max_length=16, stride=8))
  config.model.update(dict(vocab_size=384, embed_dim=16, num_layers=2, num_heads=2, max_seq_len=32))
  prepare_dataset(config, progress=False, num_processes=1)
  params = nnx.state(QTGModel(config.model, rngs=nnx.Rngs(0)), nnx.Param)
  checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=1)
  checkpointer.save(5, params=params, opt_state=optax.adam(1e-3).init(params.to_pure_dict()), meta={"step": 5},
                    config=config, val_loss=1.0)
  checkpointer.manager.wait_until_finished()
  checkpointer.manager.close()
  assert analyze.main([f"--workdir={tmp_path / 'run'}", "--windows=2"]) == 0
  names = sorted(p.name for p in (tmp_path / "run" / "analysis").iterdir())
  assert names == ["attention.png", "embedding.png", "gamma.png", "persistence.png", "summary.json"]
  assert list((tmp_path / "run" / "tensorboard").iterdir())
  assert analyze.main([f"--workdir={tmp_path / 'missing'}"]) == 2
