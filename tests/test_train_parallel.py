"""FSDP sharding rules, and a train step on two host devices equal to the same step on one."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from neon_qtg_jax import parallel
from neon_qtg_jax.config import LOGICAL_AXIS_RULES, default_config
from neon_qtg_jax.training import train_step as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_logical_names_map_to_mesh_axes_and_undivisible_dims_stay_whole():
  mesh = AbstractMesh((1, 4, 2), parallel.MESH_AXES)
  assert parallel.logical_to_mesh(("layers", "embed", None, "heads", "head_dim"), (40, 10240, 3, 40, 128),
                                  mesh, LOGICAL_AXIS_RULES) == P(None, "fsdp", None, "tensor", None)
  assert parallel.logical_to_mesh(("embed", "mlp"), (64, 6), mesh, LOGICAL_AXIS_RULES) == P("fsdp", "tensor")
  assert parallel.logical_to_mesh(("embed", "mlp"), (6, 7), mesh, LOGICAL_AXIS_RULES) == P(None, None)  # 4 and 2 divide neither
  assert parallel.logical_to_mesh(("batch", "length"), (8, 16), AbstractMesh((2, 4, 1), parallel.MESH_AXES),
                                  LOGICAL_AXIS_RULES) == \
      P(("data", "fsdp"), None)
  # a mesh axis is used once per array: the second "embed" stays whole
  assert parallel.logical_to_mesh(("embed", "embed"), (8, 8), mesh, LOGICAL_AXIS_RULES) == P("fsdp", None)


def test_every_parameter_is_split_by_its_names_and_the_optimizer_state_follows():
  c = default_config()
  c.model.update(embed_dim=64, num_heads=4, vocab_size=256)
  mesh = AbstractMesh((1, 2, 2), parallel.MESH_AXES)
  shardings = ts.state_shardings(c, parallel.ShardingConfig(mesh, LOGICAL_AXIS_RULES))
  specs = jax.tree.map(lambda s: s.spec, nnx.to_pure_dict(shardings.params))
  blocks = specs["blocks"]
  assert blocks["attn"]["w_qkv"]["kernel"] == P(None, "fsdp", None, "tensor", None)
  assert blocks["attn"]["gamma_raw"] == P(None, "tensor")
  assert blocks["w_o"]["kernel"] == P(None, "tensor", "fsdp")
  assert blocks["w_1"]["kernel"] == P(None, "fsdp", "tensor") and blocks["w_2"]["kernel"] == P(None, "tensor", "fsdp")
  assert blocks["w_psi"]["kernel"] == P(None, "fsdp", None) and blocks["ln1"]["scale"] == P(None, None)
  assert specs["embed"]["tokens"]["embedding"] == P("tensor", "fsdp") and specs["head"]["kernel"] == P("fsdp", "tensor")
  mu = shardings.opt_state[1][0].mu  # (clip state, (scale_by_adam state, weight decay, schedule))
  assert jax.tree.map(lambda s: s.spec, nnx.to_pure_dict(mu)) == specs


def test_state_shardings_cover_params_and_optimizer_on_one_device():
  c = default_config()
  sharding = parallel.ShardingConfig.from_config(c.parallel)
  shardings = ts.state_shardings(c, sharding)
  mesh = sharding.mesh
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.size == jax.device_count()
  assert len(jax.tree.leaves(shardings.opt_state)) == len(jax.tree.leaves(ts.abstract_train_state(c).opt_state))


@pytest.mark.slow  # a fresh process compiling for two devices: 20 s to well over a minute on 2 busy cores
def test_two_host_devices_give_the_single_device_result():
  script = textwrap.dedent("""
      import jax, numpy as np
      from neon_qtg_jax import parallel
      from neon_qtg_jax.config import default_config, validate
      from neon_qtg_jax.training import train_step as ts
      c = default_config()
      c.model.update(vocab_size=64, embed_dim=64, num_layers=1, num_heads=2, max_seq_len=16)
      c.data.update(max_length=16, stride=8); c.eval.update(max_length=16, stride=8)
      c.training.update(batch_size=4, grad_accum_steps=2, warmup_steps=1, total_steps=10)
      validate(c)
      tokens = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
      batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
      results = []
      for n in (1, 2):
        sharding = parallel.ShardingConfig.from_config(c.parallel, devices=jax.devices()[:n])
        graphdef, state = ts.create_train_state(c, jax.random.PRNGKey(0), sharding)
        step = ts.make_train_step(c, graphdef, sharding)
        for _ in range(2):
          state, metrics = step(state, batch)
        kernel = state.params["blocks"]["attn"]["w_qkv"]["kernel"][...]
        assert len(kernel.sharding.device_set) == n
        results.append((jax.device_get(state.params), float(metrics["loss"])))
      (p1, l1), (p2, l2) = results
      assert abs(l1 - l2) < 1e-5, (l1, l2)
      diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
      assert diff < 1e-4, diff
      print("ok", diff)
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


def test_mesh_sizes_resolve_and_bad_ones_name_the_field():
  from neon_qtg_jax.config import ConfigError, validate
  c = default_config()
  c.parallel.update(data=1, fsdp=-1, tensor=2, dcn_fsdp=2)
  assert parallel.mesh_shape(c.parallel, 16) == ({"data": 1, "fsdp": 4, "tensor": 2}, {"data": 1, "fsdp": 2,
                                                                                        "tensor": 1})
  c.parallel.update(fsdp=3)
  with pytest.raises(ConfigError, match="'parallel.data' x 'parallel.fsdp' x 'parallel.tensor' = 1 x 3 x 2"):
    parallel.mesh_shape(c.parallel, 16)
  c = default_config()
  c.parallel.tensor = 3  # the tiny model has 4 heads
  with pytest.raises(ConfigError, match="'parallel.tensor' = 3: must divide model.num_heads=4"):
    validate(c)
  c = default_config()
  c.parallel.rules = (("embed", ("fsdp", "model")),)
  with pytest.raises(ConfigError, match="parallel.rules"):
    validate(c)
