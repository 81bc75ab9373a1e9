"""Faults during checkpoint saves: kill -9 mid-save, a full disk, low free space, an unreadable step moved aside.

The kill and the full disk run in subprocesses (a process that is killed, or whose file-size
limit is lowered, must not be this one); the parent then opens the same directory the way a
resumed run does (Checkpointer.steps, restore_latest_good).
"""

import json
import logging
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from neon_qtg_jax.checkpoint import checkpointer as checkpointing
from neon_qtg_jax.checkpoint import errors as save_faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import json, os, resource, signal, sys, time
import jax.numpy as jnp, ml_collections, numpy as np
from flax import nnx
from neon_qtg_jax.checkpoint.checkpointer import Checkpointer, CheckpointSaveError

directory, fault = sys.argv[1], sys.argv[2]

class Weights(nnx.Module):
  def __init__(self, n, seed):
    self.w = nnx.Param(jnp.asarray(np.random.default_rng(seed).standard_normal(n), jnp.float32))

def save(checkpointer, step, n):
  params = nnx.state(Weights(n, step), nnx.Param)
  checkpointer.save(step, params=params, opt_state={"m": np.full(3, step, np.float32)}, meta={"step": step},
                    config=ml_collections.ConfigDict({"fault": fault}))

checkpointer = Checkpointer(directory, keep=3, on_save_error=sys.argv[3] if len(sys.argv) > 3 else "stop")
save(checkpointer, 1, 1000)
checkpointer.wait()
if fault == "kill":
  rename = os.rename
  def stalled_rename(src, dst, *args, **kwargs):
    if "orbax-checkpoint-tmp" in str(src) and os.path.basename(str(dst)) == "2":
      print("COMMITTING", flush=True)  # every file of step 2 written; only the atomic rename is left
      time.sleep(600)
    return rename(src, dst, *args, **kwargs)
  os.rename = stalled_rename
  save(checkpointer, 2, 1000)
  checkpointer.wait()
else:  # a disk that takes no file over 64 KiB: write() fails with EFBIG instead of the signal
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
  outcome = {}
  try:
    save(checkpointer, 2, 1 << 20)
    checkpointer.wait()
    outcome["error"] = None
  except CheckpointSaveError as err:
    outcome["error"] = str(err)
  save(checkpointer, 3, 1000)  # small: fits under the limit
  checkpointer.close()
  outcome["steps"] = checkpointer.steps()
  print("OUTCOME " + json.dumps(outcome), flush=True)
'''


def _child(tmp_path, fault, *extra, **popen):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), fault, *extra], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _abstract(n):
  return nnx.state(nnx.eval_shape(lambda: _Weights(n)), nnx.Param)


class _Weights(nnx.Module):
  def __init__(self, n, seed=0):
    self.w = nnx.Param(jnp.asarray(np.random.default_rng(seed).standard_normal(n), jnp.float32))


def _restore_latest(directory):
  checkpointer = checkpointing.Checkpointer(directory, keep=3)
  try:
    found = checkpointer.restore_latest_good(checkpointer.steps(), params=_abstract(1000),
                                             opt_state={"m": np.zeros(3, np.float32)})
    return checkpointer.steps(), found
  finally:
    checkpointer.close()


def test_kill9_during_an_async_save_resumes_from_the_last_complete_step(tmp_path):
  process = _child(tmp_path, "kill")
  line = process.stdout.readline()
  assert line.strip() == "COMMITTING", line + process.stderr.read()
  process.send_signal(signal.SIGKILL)
  assert process.wait(timeout=60) == -signal.SIGKILL
  directory = tmp_path / "ckpt"
  assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(directory))  # the partial step 2
  steps, (step, restored) = _restore_latest(str(directory))
  assert steps == [1] and step == 1
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"].value), np.asarray(_Weights(1000, 1).w.value))
  assert restored["meta"] == {"step": 1}


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_full_disk_during_a_save_is_a_clear_error_and_earlier_steps_stay(tmp_path, on_error):
  process = _child(tmp_path, "full", on_error)
  out, err = process.communicate(timeout=120)
  outcome = json.loads(next(line for line in out.splitlines() if line.startswith("OUTCOME "))[8:])
  if on_error == "stop":
    assert "checkpoint 2 could not be written" in outcome["error"] and "File too large" in outcome["error"]
    assert "earlier checkpoints [1] are intact" in outcome["error"]
  else:  # logged, and the run's next (smaller) save goes through
    assert outcome["error"] is None
    assert "checkpoint 2 could not be written" in err and "training goes on" in err
  assert outcome["steps"] == [1, 3]
  steps, (step, restored) = _restore_latest(str(tmp_path / "ckpt"))
  assert steps == [1, 3] and step == 3


def _save(checkpointer, step, n=1000):
  checkpointer.save(step, params=nnx.state(_Weights(n, step), nnx.Param), opt_state={"m": np.zeros(3, np.float32)},
                    meta={"step": step}, config=ml_collections.ConfigDict({}))
  checkpointer.wait()


def test_low_free_space_warns_before_the_save(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(save_faults.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 6000})())
  checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=2)
  with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
    _save(checkpointer, 1)  # 4000 bytes of params + 12 of optimizer state > 6000 / 2
  checkpointer.close()
  assert "before checkpoint 1: only 0.00 GiB free" in caplog.text
  assert save_faults.free_space_warning(str(tmp_path), 2000) is None


def test_a_step_moved_aside_is_kept_out_of_rotation(tmp_path):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3):
    _save(checkpointer, step)
  assert checkpointer.move_aside(3) == str(tmp_path / "3.unreadable") and checkpointer.steps() == [2]
  for step in (3, 4, 5):  # rotation deletes old steps; a new step 3 does not collide with the kept one
    _save(checkpointer, step)
  assert checkpointer.steps() == [4, 5]
  assert checkpointer.move_aside(5) == str(tmp_path / "5.unreadable")
  checkpointer.close()
  assert sorted(os.listdir(tmp_path)) == ["3.unreadable", "4", "5.unreadable"]
  assert os.path.isdir(tmp_path / "3.unreadable" / "params")


@pytest.mark.parametrize("where", ["cut from a long first line", "on a later line"])
def test_a_failed_save_names_the_operating_systems_reason_wherever_the_library_put_it(tmp_path, where):
  """TensorStore's messages repeat the store's spec, so the shortened message can lose the OS reason; it is kept."""
  spec = '{"driver": "zarr", "kvstore": ' + '"x" ' * 300 + "}"
  text = (f'OUT_OF_RANGE: Error writing "a/.zarray" {spec}: [OS error 27: File too large] {spec}'
          if where.startswith("cut") else f"Error writing {spec}\nOS error 27: File too large")
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  with pytest.raises(save_faults.CheckpointSaveError) as raised:
    checkpointer._save_failed(4, ValueError(text))  # pylint: disable=protected-access
  message = str(raised.value)
  assert "checkpoint 4 could not be written" in message and "File too large" in message
  assert len(message) < 900
  assert checkpointing.os_error_text("no reason here") == ""
