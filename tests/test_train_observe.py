"""What a run records to be watched: per-layer gradient and update sizes, MFU, data wait, memory, NVML, a profile."""

import gzip
import json
import os
import shutil
import socket
import subprocess
import time
import types
import urllib.request

import jax
import numpy as np
import pytest
from flax import nnx

import test_train_resume as train_runs
from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.training import observe
from neon_qtg_jax.training import train_step as ts
from neon_qtg_jax.training.metric_writers import read_jsonl
from test_train_resume import data_dir  # noqa: F401 - a fixture


def test_group_norms_match_a_plain_per_layer_reference():
  c = default_config()
  c.model.update(vocab_size=64, embed_dim=16, num_layers=3, num_heads=2, max_seq_len=16, use_bias=True)
  c.data.update(max_length=16, stride=8)
  c.eval.update(max_length=16, stride=8)
  validate(c)
  params = ts.abstract_train_state(c).params
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  params = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
  names = ts.layer_groups(params, c.model.num_layers)
  assert names[:3] == ("block_00/attention", "block_00/mlp", "block_00/norm") and names[-2:] == ("embedding",
                                                                                                   "final_norm")
  got = dict(zip(names, np.asarray(jax.jit(ts.group_norms)(params))))
  pure = nnx.to_pure_dict(params)
  kinds = {"attention": ("attn", "w_o", "w_psi"), "mlp": ("w_1", "w_2"), "norm": ("ln1", "ln2")}

  def squares(tree, layer=None):
    return sum(float(np.sum(np.square(np.asarray(x if layer is None else x[layer], np.float64))))
               for x in jax.tree.leaves(tree))

  for layer in range(c.model.num_layers):
    for kind, parts in kinds.items():
      expected = np.sqrt(sum(squares(pure["blocks"][p], layer) for p in parts if p in pure["blocks"]))
      np.testing.assert_allclose(got[f"block_{layer:02d}/{kind}"], expected, rtol=1e-5)
  np.testing.assert_allclose(got["embedding"], np.sqrt(squares(pure["embed"]) + squares(pure["head"])), rtol=1e-5)
  np.testing.assert_allclose(got["final_norm"], np.sqrt(squares(pure["ln_f"])), rtol=1e-5)
  ratios = ts.layer_stats(params, jax.tree.map(lambda x: 0.5 * x, params), params)
  np.testing.assert_allclose(ratios["update_ratio"], 0.5, rtol=1e-6)


class FakeNVML:
  """The pynvml calls DeviceStats makes, with fixed readings (milliwatts, percent)."""

  def nvmlDeviceGetUtilizationRates(self, handle):
    return types.SimpleNamespace(gpu={"a": 90, "b": 70}[handle])

  def nvmlDeviceGetPowerUsage(self, handle):
    return {"a": 650_000, "b": 600_500}[handle]


def test_nvml_readings_and_their_absence_off_nvidia():
  assert observe.nvml_scalars(FakeNVML(), ["a", "b"]) == {"gpu/utilization_pct": 80.0, "gpu/utilization_min_pct": 70.0,
                                                          "gpu/power_w": 1250.5}
  assert observe.nvml_scalars(FakeNVML(), []) == {}
  assert observe._nvml_handles() == (None, [])  # pylint: disable=protected-access  # this CPU: no error, no gpu/*
  memory = observe.memory_scalars()
  assert memory["memory/host_rss_gib"] > 0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_run_records_layer_stats_mfu_data_wait_memory_and_a_profile_tensorboard_lists(data_dir, tmp_path):  # noqa: F811
  workdir = str(tmp_path)
  result = train_runs.run(data_dir, workdir, 6, "--config.training.log_steps=3", "--config.training.profile_start_step=2",
                          "--config.training.profile_num_steps=3")
  assert result.returncode == 0, result.stdout + result.stderr
  records = [r for r in read_jsonl(os.path.join(workdir, "outputs", "logs", "metrics.jsonl")) if "train/loss" in r]
  assert [r["step"] for r in records] == [3, 6]
  keys = set(records[-1])
  assert {"perf/mfu", "perf/data_wait_s", "perf/compute_s", "perf/data_wait_fraction", "perf/model_tflops_per_s",
          "memory/host_rss_gib"} <= keys
  assert {"grad_norm/block_00/attention", "grad_norm/block_00/mlp", "grad_norm/block_00/norm", "grad_norm/embedding",
          "update_ratio/block_00/attention", "update_ratio/final_norm"} <= keys
  assert 0 < records[-1]["perf/mfu"] < 1 and records[-1]["grad_norm/embedding"] > 0
  assert os.path.exists(os.path.join(workdir, "outputs", "plots", "layers.png"))
  assert "profiling steps 2..4" in result.stdout
  runs = os.listdir(os.path.join(workdir, "tensorboard", "plugins", "profile"))
  assert len(runs) == 1
  assert any(name.endswith(".xplane.pb") for name in os.listdir(os.path.join(workdir, "tensorboard", "plugins",
                                                                            "profile", runs[0])))
  if shutil.which("tensorboard") is None:
    pytest.skip("tensorboard is not installed: the trace is written, its listing by the profile plugin is not checked")
  port = _free_port()
  server = subprocess.Popen([shutil.which("tensorboard"), "--logdir", os.path.join(workdir, "tensorboard"), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline, listed = time.monotonic() + 120, None
    while listed is None:
      assert time.monotonic() < deadline and server.poll() is None, "tensorboard did not answer"
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/profile/runs", timeout=5) as reply:
          body = reply.read()
          listed = json.loads(gzip.decompress(body) if reply.headers.get("Content-Encoding") == "gzip" else body)
      except OSError:
        time.sleep(1)
  finally:
    server.terminate()
    server.wait(timeout=30)
  assert listed == runs  # the profile plugin (xprof) lists the run
