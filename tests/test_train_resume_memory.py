"""A resume restores into the abstract sharded state: it never holds a fresh state beside the restored one."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "resume_memory_child.py")


def child(mode: str, workdir: str) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, CHILD, mode, workdir], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_resume_peak_memory_is_that_of_a_fresh_start(tmp_path):
  saved = child("save", str(tmp_path))
  fresh = child("fresh", str(tmp_path))
  resumed = child("resume", str(tmp_path))
  assert fresh["step"] == 0 and fresh["checksum"] != saved["checksum"]
  assert resumed["step"] == saved["step"] == 3 and resumed["checksum"] == saved["checksum"]  # restored, not initialised
  # ~0.7 GB of float32 state: holding a second copy (the old init-then-restore) measured 1.33x here.
  assert resumed["peak_rss_bytes"] <= 1.3 * fresh["peak_rss_bytes"], (resumed, fresh)
