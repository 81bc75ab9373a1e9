"""Backup storage: finalized checkpoints copied with checksums to s3://, gs:// or a directory, and read back verified.

Layout under `training.backup_url`:

  checkpoints/{step}/...                   a copy of the local Orbax step directory
  checkpoints/{step}/backup_index.json     written last: size and sha256 of every file, the step's metrics
  run/                                     what a fresh machine needs beside a checkpoint: the tokenizer,
                                           data settings and manifest of data.data_dir, the run config
  run/backup_index.json

A step (or run/) counts as backed up only when its index exists and every file matches it, so an
upload cut short or an object changed afterwards is detected on restore and the previous step is
used. Storage goes through etils.epath, which uses fsspec (s3fs for s3://, gcsfs for gs://); the
endpoint (MinIO, Ceph) and the credentials come from their usual environment and config files
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws, FSSPEC_S3 ...), never
from the run config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any

from etils import epath

from neon_qtg_jax.checkpoint.errors import BackupError

log = logging.getLogger("neon_qtg_jax")

INDEX_FILE = "backup_index.json"
CHECKPOINTS = "checkpoints"
RUN_FILES = "run"
FETCH_DIR = "backup_restore"      # under the workdir: the step fetched for a resume
CHUNK_BYTES = 8 << 20
METRICS_FILE = os.path.join("metrics", "metrics")  # where Orbax's CheckpointManager keeps a step's metrics
DATA_RUN_FILES = ("tokenizer.model", "tokenizer.json", "settings.json", "manifest.json")
# A fresh machine prepares data_dir again with the backed-up tokenizer; the manifest stays in the
# backup for reference (restoring it would mark data_dir as prepared without its token files).
DATA_RESTORE_FILES = ("tokenizer.model", "tokenizer.json", "settings.json")


def is_url(path: str) -> bool:
  return "://" in str(path)


def location(url_or_dir: str) -> epath.Path:
  """The backup root as an epath.Path: URLs as they are, directories made absolute."""
  return epath.Path(url_or_dir if is_url(url_or_dir) else os.path.abspath(url_or_dir))


def _copy(src: epath.Path, dst: epath.Path) -> tuple[int, str]:
  """Streams src to dst in chunks; returns (bytes, sha256 hex) of what was read."""
  digest, size = hashlib.sha256(), 0
  with src.open("rb") as fin, dst.open("wb") as fout:
    while chunk := fin.read(CHUNK_BYTES):
      digest.update(chunk)
      size += len(chunk)
      fout.write(chunk)
  return size, digest.hexdigest()


def _files(directory: epath.Path) -> list[str]:
  """Relative paths of every file under a local directory, sorted."""
  out = []
  for root, _, names in os.walk(directory):
    out.extend(os.path.relpath(os.path.join(root, n), directory) for n in names)
  return sorted(out)


def remove(path: epath.Path) -> None:
  if path.exists():
    path.rmtree() if path.is_dir() else path.unlink()


def upload_dir(local: str, remote: epath.Path, extra: dict[str, Any] | None = None) -> int:
  """Copies a local directory to `remote`, checks the sizes there, then writes the index; returns bytes.

  The old index goes first, so a replaced step is never complete while its files change.
  """
  names = _files(epath.Path(local))
  if not names:
    raise FileNotFoundError(2, "nothing to upload", local)
  remove(remote / INDEX_FILE)
  remove(remote)
  remote.mkdir(parents=True, exist_ok=True)
  files, total = {}, 0
  for rel in names:
    target = remote / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    size, sha = _copy(epath.Path(local) / rel, target)
    files[rel] = {"size": size, "sha256": sha}
    total += size
  for rel, entry in files.items():
    stored = (remote / rel).stat().length
    if stored != entry["size"]:
      raise BackupError(f"{remote / rel}: {stored} bytes stored, {entry['size']} uploaded")
  (remote / INDEX_FILE).write_text(json.dumps({"files": files, **(extra or {})}, indent=1))
  return total


def read_index(remote: epath.Path) -> dict[str, Any]:
  path = remote / INDEX_FILE
  try:
    return json.loads(path.read_text())
  except FileNotFoundError as err:
    raise BackupError(f"{remote} is incomplete: no {INDEX_FILE} (the upload did not finish)") from err
  except json.JSONDecodeError as err:
    raise BackupError(f"{path} is not valid JSON ({err})") from err


def download_dir(remote: epath.Path, local: str, names: tuple[str, ...] | None = None) -> dict[str, Any]:
  """Copies `remote` to the local directory `local` checking every file against the index; returns the index.

  names: only these files (default: all). Writes into `local`.partial and renames it when every
  file matched, so `local` never holds a partial copy. Raises BackupError naming the file that differs.
  """
  index = read_index(remote)
  partial = local.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    for rel, entry in index["files"].items():
      if names is not None and rel not in names:
        continue
      target = epath.Path(partial) / rel
      target.parent.mkdir(parents=True, exist_ok=True)
      try:
        size, sha = _copy(remote / rel, target)
      except FileNotFoundError as err:
        raise BackupError(f"{remote / rel} is listed in the index but missing") from err
      if (size, sha) != (entry["size"], entry["sha256"]):
        raise BackupError(f"{remote / rel} differs from the index: {size} bytes, sha256 {sha[:12]}..., expected "
                          f"{entry['size']} bytes, sha256 {entry['sha256'][:12]}...")
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  shutil.rmtree(local, ignore_errors=True)
  os.replace(partial, local)
  return index


def step_metrics(step_dir: str) -> dict[str, float]:
  """The metrics Orbax saved with a step (e.g. val_loss), or {}."""
  try:
    with open(os.path.join(step_dir, METRICS_FILE), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def uncached(path: epath.Path) -> epath.Path:
  """`path` after dropping fsspec's cached listings: another process may have changed the backup."""
  if is_url(str(path)):
    epath.backend.fsspec_backend.fs(str(path)).invalidate_cache()
  return path


def backed_up_steps(url: str) -> list[int]:
  """Steps under url/checkpoints that have an index, ascending (the files are checked when fetched)."""
  root = uncached(location(url) / CHECKPOINTS)
  if not root.exists():
    return []
  steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
  return sorted(s for s in steps if (root / str(s) / INDEX_FILE).exists())


def _order(url: str, steps: list[int], which: str) -> list[int]:
  """Steps to try, first choice first: `which` is "latest", "best" or a step number."""
  if which.isdigit():
    if int(which) not in steps:
      raise FileNotFoundError(f"no backed-up checkpoint for step {which} in {url}; have steps {steps}")
    return [int(which)]
  newest_first = sorted(steps, reverse=True)
  if which == "best":
    losses = {s: read_index(location(url) / CHECKPOINTS / str(s)).get("metrics", {}).get("val_loss")
              for s in steps}
    scored = sorted((v, -s) for s, v in losses.items() if v is not None)
    best = [-s for _, s in scored]
    return best + [s for s in newest_first if s not in best]
  return newest_first


def fetch_step(url: str, step: int, local_dir: str) -> str:
  """Downloads backup step `step` into local_dir/{step}, every file checked; returns that path.

  Raises BackupError naming the file that is missing or differs (nothing is left at the path then).
  """
  remote = location(url) / CHECKPOINTS / str(step)
  start = time.perf_counter()
  target = os.path.join(local_dir, str(step))
  index = download_dir(remote, target)
  size = sum(e["size"] for e in index["files"].values())
  log.info("backup: fetched step %d from %s (%.1f MB in %.1f s, checksums match)", step, url, size / 2**20,
           time.perf_counter() - start)
  return target


def fetch_checkpoint(url: str, local_dir: str, which: str = "latest") -> int:
  """Downloads one verified step of the backup into local_dir/{step}; returns the step.

  A step whose files do not match its index is reported and the next one tried (for "latest" and
  "best"); raises FileNotFoundError when the backup holds no usable step.
  """
  steps = backed_up_steps(url)
  if not steps:
    raise FileNotFoundError(f"no backed-up checkpoint in {url}")
  for step in _order(url, steps, which):
    try:
      fetch_step(url, step, local_dir)
      return step
    except BackupError as err:
      log.warning("backup step %s/%s/%d is unusable (%s); trying the previous one", url, CHECKPOINTS, step, err)
  raise FileNotFoundError(f"no backed-up checkpoint in {url} matches its index (see the warnings above)")


def fetch_data_files(url: str, data_dir: str) -> bool:
  """Puts the backed-up tokenizer and data settings into data_dir when it has no tokenizer; True if it did."""
  if not url or os.path.exists(os.path.join(data_dir, DATA_RESTORE_FILES[0])):
    return False
  remote = location(url) / RUN_FILES
  if not (remote / INDEX_FILE).exists():
    return False
  fetched = f"{os.path.abspath(data_dir)}.from_backup.{os.getpid()}"  # one per process: several may share data_dir
  download_dir(remote, fetched, DATA_RESTORE_FILES)
  os.makedirs(data_dir, exist_ok=True)
  for name in os.listdir(fetched):
    os.replace(os.path.join(fetched, name), os.path.join(data_dir, name))
  os.rmdir(fetched)
  log.info("backup: tokenizer and data settings for %s restored from %s", data_dir, url)
  return True


def localize(url: str, which: str = "latest", cache_dir: str | None = None) -> str:
  """A local path for a checkpoint URL (eval, generate): url/checkpoints/{step}, or a backup root with `which`.

  Verified downloads are cached under cache_dir (default: $XDG_CACHE_HOME or ~/.cache, then
  neon_qtg_jax/backup) by URL and step, and reused while the step's index is unchanged. The
  tokenizer goes into the run's data.data_dir when that has none.
  """
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  cache_dir = cache_dir or os.path.join(cache_home, "neon_qtg_jax", "backup")
  path = str(url).rstrip("/")
  match = re.match(rf"^(.*)/{CHECKPOINTS}/(\d+)$", path)
  root, which = (match.group(1), match.group(2)) if match else (path, str(which))
  local_dir = os.path.join(cache_dir, hashlib.sha256(root.encode()).hexdigest()[:16])
  steps = backed_up_steps(root)
  if not steps:
    raise FileNotFoundError(f"no backed-up checkpoint in {root}")
  step = _order(root, steps, which)[0]
  index_text = (location(root) / CHECKPOINTS / str(step) / INDEX_FILE).read_text()
  marker = os.path.join(local_dir, f"{step}.index.json")
  cached = os.path.exists(marker) and epath.Path(marker).read_text() == index_text
  if not cached:
    step = fetch_checkpoint(root, local_dir, str(step) if which.isdigit() else which)
    with open(os.path.join(local_dir, f"{step}.index.json"), "w", encoding="utf-8") as f:
      f.write((location(root) / CHECKPOINTS / str(step) / INDEX_FILE).read_text())
  step_dir = os.path.join(local_dir, str(step))
  with open(os.path.join(step_dir, "config", "metadata"), encoding="utf-8") as f:
    data_dir = json.load(f)["data"]["data_dir"]
  fetch_data_files(root, data_dir)
  return step_dir


