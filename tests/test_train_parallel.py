"""FSDP sharding rules, and a train step on two host devices equal to the same step on one."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from neon_qtg_jax import parallel
from neon_qtg_jax.config import default_config
from neon_qtg_jax.training import train_step as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fsdp_spec_splits_the_largest_divisible_axis():
  assert parallel.fsdp_spec((4, 1024, 3072), 8, skip_leading=1) == P(None, None, "fsdp")
  assert parallel.fsdp_spec((30000, 6144), 8) == P("fsdp", None)
  assert parallel.fsdp_spec((30001, 6144), 8) == P(None, "fsdp")
  assert parallel.fsdp_spec((80, 16384), 8, skip_leading=1) == P(None, "fsdp")  # layer axis never split
  assert parallel.fsdp_spec((4, 128), 2, skip_leading=1) == P()  # a tiny stacked norm stays replicated
  assert parallel.fsdp_spec((30000, 6144), 1) == P()
  assert parallel.fsdp_spec((7, 7 * 4099), 2) == P()  # nothing divisible


def test_state_shardings_cover_params_and_optimizer_on_one_device():
  c = default_config()
  mesh = parallel.make_mesh()
  shardings = ts.state_shardings(c, mesh)
  assert mesh.axis_names == ("data", "fsdp") and mesh.size == jax.device_count()
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
        mesh = parallel.make_mesh(devices=jax.devices()[:n])
        graphdef, state = ts.create_train_state(c, jax.random.PRNGKey(0), mesh)
        step = ts.make_train_step(c, graphdef, mesh)
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
