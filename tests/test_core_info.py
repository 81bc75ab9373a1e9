"""--mode=info: exact parameter counts from abstract shapes."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

from neon_qtg_jax.info import flops_per_token, parameter_breakdown, summarize

ROOT = Path(__file__).resolve().parents[1]


def spec_count(m) -> int:
  d = m.embed_dim
  scales = m.num_heads * (2 if m.sphere_map == "normed" else 1)  # gamma per head, and beta with the normed map
  per_block = 28 * d * d + 2 * (2 * 2 * d) + scales  # matrices, two LayerNorms (scale+bias), scales
  embeddings = m.vocab_size * 2 * d + m.max_seq_len * 2 * d
  head_and_final_norm = 2 * d * m.vocab_size + 2 * 2 * d
  return m.num_layers * per_block + embeddings + head_and_final_norm


def test_seven_b_count_equals_the_spec_exactly():
  config = importlib.import_module("configs.neon_qtg_7b").get_config()
  total = sum(parameter_breakdown(config.model).values())
  assert total == spec_count(config.model)
  assert 6.6e9 < total < 6.8e9


def test_count_matches_a_real_model():
  from flax import nnx
  import jax
  from neon_qtg_jax.config import default_config
  from neon_qtg_jax.model import QTGModel
  m = default_config().model
  real = sum(x.size for x in jax.tree.leaves(nnx.state(QTGModel(m, rngs=nnx.Rngs(0)), nnx.Param)))
  assert sum(parameter_breakdown(m).values()) == real == spec_count(m)


def test_standard_gpt_count_and_the_equal_parameter_ffn_width():
  """Without W_psi a block has 24 d^2 weights; mlp_ratio 5 brings it back to QTG's 28 d^2."""
  from neon_qtg_jax.config import default_config
  qtg = default_config().model
  gpt = default_config().model
  gpt.update(dict(attention="dot", topofilter=False, w_psi=False, amplitude_embedding=False))
  gamma = qtg.num_layers * qtg.num_heads * (2 if qtg.sphere_map == "normed" else 1)  # gamma (and beta) per head
  d = qtg.embed_dim
  qtg_count, gpt_count = sum(parameter_breakdown(qtg).values()), sum(parameter_breakdown(gpt).values())
  assert qtg_count - gpt_count == qtg.num_layers * 4 * d * d + gamma
  assert "blocks.w_psi" not in parameter_breakdown(gpt)
  gpt.mlp_ratio = 5
  assert sum(parameter_breakdown(gpt).values()) == qtg_count - gamma
  config = default_config()
  config.model.update(dict(attention="dot", topofilter=False, w_psi=False, amplitude_embedding=False))
  assert flops_per_token(config)["matmuls"] == 2 * (qtg.num_layers * 24 * d * d + 2 * d * qtg.vocab_size)


def test_flops_split_and_train_is_three_forward():
  config = importlib.import_module("configs.neon_qtg_7b").get_config()
  f = flops_per_token(config)
  assert f["forward"] == f["matmuls"] + f["attention"] + f["topofilter"]
  assert f["train"] == 3 * f["forward"]
  params = sum(parameter_breakdown(config.model).values())
  assert 2 * params * 0.9 < f["matmuls"] < 2 * params  # embeddings and norms have no matmul FLOPs
  config.model.topofilter = False
  assert flops_per_token(config)["topofilter"] == 0


def test_info_json_for_100b_runs_without_allocating():
  result = subprocess.run([sys.executable, "launch.py", "--config=configs/neon_qtg_100b.py", "--mode=info",
                           "--info_format=json"], cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr
  info = json.loads(result.stdout)
  assert abs(info["params"] - 1e11) < 0.02e11  # the name says its size
  assert info["num_devices"] == 64 and info["mesh"] == {"data": 1, "fsdp": 16, "tensor": 4}
  assert info["estimates"]["H200"]["memory_fits"]
  assert set(info["estimates"]) == {"H100", "H200"}
  memory = info["memory_bytes_per_device"]
  assert memory["total"] == sum(v for k, v in memory.items() if k != "total")


def test_summary_days_follow_from_step_time():
  config = importlib.import_module("configs.neon_qtg_7b").get_config()
  est = summarize(config)["estimates"]["H200"]
  assert abs(est["days_for_total_steps"] - est["step_seconds"] * 200000 / 86400) < 1e-9


def test_info_lists_every_variant_with_its_real_parameter_count():
  from flax import nnx
  import jax
  from neon_qtg_jax.config import default_config
  from neon_qtg_jax.model import QTGModel
  from neon_qtg_jax.model.variants import VARIANTS, variant_config
  config = default_config()
  listed = summarize(config)["variants"]
  assert sorted(listed) == sorted(VARIANTS)
  for name, sizes in listed.items():
    model = QTGModel(variant_config(config, name).model, rngs=nnx.Rngs(0))
    assert sizes["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))), name
    assert sizes["train_flops_per_token"] == flops_per_token(variant_config(config, name))["train"]
  assert listed["gpt"]["train_flops_per_token"] > listed["qtg"]["train_flops_per_token"]
