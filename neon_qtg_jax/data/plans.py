"""Work directories that are reused only for the plan that made them (preparation's shards, the filter stages)."""

from __future__ import annotations

import json
import os
import shutil
import sys


def keep_or_reset(directory: str, plan_file: str, plan: dict, changed: str, progress: bool) -> None:
  """Keeps `directory` when `directory/plan_file` holds `plan`; otherwise empties it and writes `plan`.

  `changed` says what a different plan means (printed when progress)."""
  path = os.path.join(directory, plan_file)
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f) == plan:
        return
    if progress:
      print(f"{directory}: {changed}", file=sys.stderr, flush=True)
    shutil.rmtree(directory)
  os.makedirs(directory, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(plan, f)
  os.replace(path + ".tmp", path)
