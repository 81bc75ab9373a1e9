"""Which code made a run: the git commit of this checkout, `git describe`, and a hash of uncommitted changes.

Taken once when a study process starts (Python does not reload modules, so every run of that
process ran the code of that moment) and stored in each run's record, not at report time.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess

# What a run's numbers depend on; uncommitted changes elsewhere (docs, the report) do not count.
CODE_PATHS = ("neon_qtg_jax", "configs", "tools", "launch.py")
UNKNOWN = {"describe": "unknown", "commit": "unknown", "dirty_sha256": ""}


def _git(*args: str) -> str:
  return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=60,
                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
  """{"describe": `git describe --always --dirty`, "commit": full hash, "dirty_sha256": sha256 of
  `git diff HEAD` over CODE_PATHS (empty when those are clean)}; UNKNOWN outside a git checkout."""
  try:
    root = _git("rev-parse", "--show-toplevel").strip()
    diff = subprocess.run(["git", "diff", "HEAD", "--", *CODE_PATHS], capture_output=True, check=True,
                          timeout=60, cwd=root).stdout
    return {"describe": _git("describe", "--always", "--dirty").strip(), "commit": _git("rev-parse", "HEAD").strip(),
            "dirty_sha256": hashlib.sha256(diff).hexdigest() if diff else ""}
  except (OSError, subprocess.SubprocessError):
    return dict(UNKNOWN)


def version_label(code: dict[str, str]) -> str:
  """One short name per distinct code: the commit, plus the first digits of the uncommitted changes' hash."""
  commit = code.get("commit", "unknown")[:12]
  return commit + (f"+{code['dirty_sha256'][:8]}" if code.get("dirty_sha256") else "")
