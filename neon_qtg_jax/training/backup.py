"""Backup of finalized checkpoints to object storage (s3://, gs://) or another directory, and restore from it.

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

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import threading
import time
from typing import Any

from etils import epath

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
SCHEMES = ("s3", "gs")
FSSPEC_PACKAGES = {"s3": "s3fs", "gs": "gcsfs"}
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


class BackupError(RuntimeError):
  """A backup step or file that is missing, incomplete or differs from its index."""


def is_url(path: str) -> bool:
  return "://" in str(path)


def url_problem(url: str) -> str | None:
  """Why `url` cannot be a backup location (None when it can): s3://bucket[/prefix], gs://... or a directory."""
  if not url or not is_url(url):
    return None
  scheme, rest = url.split("://", 1)
  if scheme not in SCHEMES:
    return f"scheme {scheme}:// is not supported; use s3://bucket/prefix, gs://bucket/prefix or a directory path"
  if not BUCKET_NAME.match(rest.split("/", 1)[0]):
    return f"{url!r} does not start with a valid bucket name ({scheme}://bucket/prefix)"
  package = FSSPEC_PACKAGES[scheme]
  if importlib.util.find_spec(package) is None:
    return f"{scheme}:// needs the {package} package (pip install {package})"
  return None


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


def _remove(path: epath.Path) -> None:
  if path.exists():
    path.rmtree() if path.is_dir() else path.unlink()


def upload_dir(local: str, remote: epath.Path, extra: dict[str, Any] | None = None) -> int:
  """Copies a local directory to `remote`, checks the sizes there, then writes the index; returns bytes.

  The old index goes first, so a replaced step is never complete while its files change.
  """
  names = _files(epath.Path(local))
  if not names:
    raise FileNotFoundError(2, "nothing to upload", local)
  _remove(remote / INDEX_FILE)
  _remove(remote)
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


def _fresh(path: epath.Path) -> epath.Path:
  """`path` after dropping fsspec's cached listings: another process may have changed the backup."""
  if is_url(str(path)):
    epath.backend.fsspec_backend.fs(str(path)).invalidate_cache()
  return path


def backed_up_steps(url: str) -> list[int]:
  """Steps under url/checkpoints that have an index, ascending (the files are checked when fetched)."""
  root = _fresh(location(url) / CHECKPOINTS)
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


def fetch_checkpoint(url: str, local_dir: str, which: str = "latest") -> int:
  """Downloads one verified step of the backup into local_dir/{step}; returns the step.

  A step whose files do not match its index is reported and the next one tried (for "latest" and
  "best"); raises FileNotFoundError when the backup holds no usable step.
  """
  steps = backed_up_steps(url)
  if not steps:
    raise FileNotFoundError(f"no backed-up checkpoint in {url}")
  for step in _order(url, steps, which):
    remote = location(url) / CHECKPOINTS / str(step)
    try:
      start = time.perf_counter()
      index = download_dir(remote, os.path.join(local_dir, str(step)))
      size = sum(e["size"] for e in index["files"].values())
      log.info("backup: fetched step %d from %s (%.1f MB in %.1f s, checksums match)", step, url, size / 2**20,
               time.perf_counter() - start)
      return step
    except BackupError as err:
      log.warning("backup step %s is unusable (%s); trying the previous one", remote, err)
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


def fetch_for_resume(config: Any, args: Any, workdir: str, *, local_unreadable: bool = False) -> Any:
  """The run arguments after fetching a checkpoint from training.backup_url when the resume needs one.

  With --resume_from=backup, or with no --resume_from when the workdir has no finalized checkpoint
  (or `local_unreadable`: none that reads), the newest verified backup step is downloaded to
  {workdir}/backup_restore/{step} and --resume_from points there. Also restores the tokenizer into
  data.data_dir when it is missing. Returns args unchanged when there is nothing to fetch.
  """
  url = config.training.backup_url
  if args.resume_from == "backup" and not url:
    raise FileNotFoundError("--resume_from=backup: config field training.backup_url is empty")
  if not url:
    return args
  explicit = args.resume_from == "backup"
  local = os.path.join(workdir, CHECKPOINTS)
  has_local = os.path.isdir(local) and any(n.isdigit() for n in os.listdir(local))
  if not explicit and (args.resume_from or (has_local and not local_unreadable)):
    return args
  target = _fetch_target(workdir)
  shutil.rmtree(target, ignore_errors=True)
  try:
    fetch_data_files(url, config.data.data_dir)
    step = fetch_checkpoint(url, target)
  except FileNotFoundError as err:
    if explicit:
      raise
    log.info("backup: nothing to resume from in %s (%s)", url, err)
    return args
  except Exception as err:  # noqa: BLE001 - unreachable or unreadable: starting from 0 could overwrite a run
    raise BackupError(f"cannot read the backup {url} ({type(err).__name__}: {err}); the workdir has no usable "
                      f"checkpoint, so the backup decides whether this run resumes") from err
  return dataclasses.replace(args, resume_from=os.path.join(target, str(step)))


def _fetch_target(workdir: str) -> str:
  """Where this process puts a fetched step: each process of a multi-process run its own copy."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return os.path.join(workdir, FETCH_DIR)
  return os.path.join(workdir, FETCH_DIR, f"process_{jax.process_index()}")


def discard_fetched(workdir: str) -> None:
  """Removes the step fetched for the resume once it is restored (the run's own checkpoints follow)."""
  shutil.rmtree(_fetch_target(workdir), ignore_errors=True)
  with contextlib.suppress(OSError):
    os.rmdir(os.path.join(workdir, FETCH_DIR))  # once every process removed its copy


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


@dataclasses.dataclass
class BackupStatus:
  """What the uploader reports (TensorBoard scalars under backup/)."""
  last_step: int = -1
  failures: int = 0           # failed attempts in total
  consecutive_failures: int = 0
  pending: int = 0            # finalized local steps not yet in the backup
  megabytes: float = 0.0      # uploaded in total
  seconds: float = 0.0        # spent uploading


class BackupUploader:
  """Mirrors the finalized steps of a local Orbax checkpoint directory to the backup in a background thread.

  A step directory is final once Orbax renamed it to its step number. New steps are uploaded
  newest first; a step that Orbax's keep policy deleted locally is deleted from the backup after
  it; a failed upload is logged and retried with exponential backoff. Training never waits for
  it, except in close(), which gives pending uploads a bounded time.
  """

  def __init__(self, url: str, checkpoint_dir: str, run_files: dict[str, str], *, start_step: int = 0,
               poll_seconds: float = 1.0, initial_backoff: float = 1.0, max_backoff: float = 60.0):
    self.url, self.root, self.checkpoint_dir = url, location(url), checkpoint_dir
    self.run_files = dict(run_files)
    self.poll_seconds, self.initial_backoff, self.max_backoff = poll_seconds, initial_backoff, max_backoff
    self.status = BackupStatus()
    self._uploaded: set[int] = set()     # steps this uploader put in the backup (or found complete there)
    self._run_files_done = False
    self._interrupted = False            # a sync failed: partial uploads may be left in the backup
    self._start_step = start_step
    # Local steps after the one the run resumed from are stale (unreadable, or of an abandoned branch):
    # never uploaded unless the run writes that step again (a new directory, a new mtime).
    self._stale = {s: self._mtime(s) for s in self._local_steps() if s > start_step}
    self._lock = threading.Lock()
    self._stop = threading.Event()       # set by close(): one last sync, retried until it succeeds or...
    self._give_up = threading.Event()    # ...close() stops waiting
    self._thread = threading.Thread(target=self._loop, name="checkpoint-backup", daemon=True)
    self._thread.start()

  def _local_steps(self) -> list[int]:
    try:
      return sorted(int(n) for n in os.listdir(self.checkpoint_dir) if n.isdigit())
    except FileNotFoundError:
      return []

  def _current_steps(self) -> list[int]:
    """The finalized local steps of this run: stale ones are left out until written again."""
    out = []
    for step in self._local_steps():
      if step in self._stale:
        if self._stale[step] == self._mtime(step):
          continue
        self._stale.pop(step, None)
      out.append(step)
    return out

  def _mtime(self, step: int) -> int | None:
    try:
      return os.stat(os.path.join(self.checkpoint_dir, str(step))).st_mtime_ns
    except FileNotFoundError:
      return None

  def _upload_run_files(self) -> None:
    staging = os.path.join(os.path.dirname(self.checkpoint_dir), FETCH_DIR + ".run_files")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for name, src in self.run_files.items():
      if os.path.exists(src):
        shutil.copy2(src, os.path.join(staging, name))
    if os.listdir(staging):
      upload_dir(staging, self.root / RUN_FILES)
    shutil.rmtree(staging, ignore_errors=True)
    self._run_files_done = True

  def _drop_abandoned(self) -> None:
    """Backup steps after the resumed one belong to an abandoned branch (the workdir deleted them too)."""
    if self._start_step <= 0:
      return
    for step in backed_up_steps(self.url):
      if step > self._start_step:
        log.warning("backup: deleting step %d in %s: the run resumed from the older step %d", step, self.url,
                    self._start_step)
        _remove(self.root / CHECKPOINTS / str(step) / INDEX_FILE)
        _remove(self.root / CHECKPOINTS / str(step))
    self._start_step = 0

  def sync_once(self) -> None:
    """Uploads run files and every finalized step not yet in the backup, then mirrors local deletions."""
    if not self._run_files_done:
      self._upload_run_files()
      self._drop_abandoned()
      self._uploaded |= set(backed_up_steps(self.url)) & set(self._current_steps())
      self.status.last_step = max(self._uploaded, default=-1)
    local = self._current_steps()
    with self._lock:
      self.status.pending = len([s for s in local if s not in self._uploaded])
    for step in sorted(local, reverse=True):  # newest first: after an outage the resume point goes up first
      if step in self._uploaded:
        continue
      step_dir = os.path.join(self.checkpoint_dir, str(step))
      start = time.perf_counter()
      try:
        size = upload_dir(step_dir, self.root / CHECKPOINTS / str(step),
                          {"step": step, "metrics": step_metrics(step_dir), "time": time.time()})
      except FileNotFoundError as err:
        if not str(err.filename or "").startswith(step_dir):
          raise
        log.info("backup: step %d was deleted locally (keep policy) during its upload; skipped", step)
        _remove(self.root / CHECKPOINTS / str(step))
        continue
      elapsed = time.perf_counter() - start
      self._uploaded.add(step)
      with self._lock:
        self.status.last_step = max(self.status.last_step, step)
        self.status.megabytes += size / 2**20
        self.status.seconds += elapsed
        self.status.pending = len([s for s in self._current_steps() if s not in self._uploaded])
      log.info("backup: step %d uploaded to %s (%.1f MB in %.1f s)", step, self.url, size / 2**20, elapsed)
    kept = set(self._current_steps())
    if not kept:
      return
    for step in sorted(self._uploaded - kept):  # every kept step is in the backup by now
      _remove(self.root / CHECKPOINTS / str(step) / INDEX_FILE)
      _remove(self.root / CHECKPOINTS / str(step))
      self._uploaded.discard(step)
      log.info("backup: step %d deleted from %s (no longer kept locally)", step, self.url)
    if self._interrupted:  # an upload cut short left files without an index: remove those of gone steps
      for path in _fresh(self.root / CHECKPOINTS).iterdir():
        if path.name.isdigit() and int(path.name) not in kept and not (path / INDEX_FILE).exists():
          _remove(path)
          log.info("backup: removed the unfinished upload %s", path)
      self._interrupted = False

  def _loop(self) -> None:
    backoff = self.initial_backoff
    while not self._give_up.is_set():
      final = self._stop.is_set()
      try:
        self.sync_once()
      except Exception as err:  # noqa: BLE001 - any storage error: report, retry later, never stop training
        self._interrupted = True
        with self._lock:
          self.status.failures += 1
          self.status.consecutive_failures += 1
          attempt = self.status.consecutive_failures
        log.warning("backup to %s failed (attempt %d: %s: %s); retrying in %.0f s, training continues",
                    self.url, attempt, type(err).__name__, str(err).splitlines()[0] if str(err) else "", backoff)
        (self._give_up if final else self._stop).wait(backoff)  # close() cuts the wait short
        backoff = min(2 * backoff, self.max_backoff)
        continue
      with self._lock:
        if self.status.consecutive_failures:
          log.info("backup: %s reachable again after %d failed attempt(s)", self.url,
                   self.status.consecutive_failures)
        self.status.consecutive_failures = 0
      backoff = self.initial_backoff
      if final:
        return
      self._stop.wait(self.poll_seconds)

  def scalars(self) -> dict[str, float]:
    """backup/* values for the metric writers."""
    with self._lock:
      s = self.status
      out = {"backup/last_step": float(s.last_step), "backup/failures": float(s.failures),
             "backup/pending_steps": float(s.pending), "backup/uploaded_mb": s.megabytes}
      if s.seconds > 0:
        out["backup/upload_mb_per_s"] = s.megabytes / s.seconds
    return out

  def close(self, timeout_s: float) -> bool:
    """Lets the uploader finish every finalized step, for at most timeout_s; True when all are backed up."""
    self._stop.set()
    self._thread.join(timeout_s)
    self._give_up.set()
    done = not self._thread.is_alive() and all(s in self._uploaded for s in self._current_steps())
    if done:
      log.info("backup: every checkpoint is in %s (last step %d)", self.url, self.status.last_step)
    else:
      missing = [s for s in self._current_steps() if s not in self._uploaded]
      log.warning("backup: steps %s are not in %s after waiting %.0f s (training.backup_wait_minutes); "
                  "the next run with this workdir uploads them", missing, self.url, timeout_s)
    return done


class NoBackup:
  """Stands in for BackupUploader when training.backup_url is empty."""

  def scalars(self) -> dict[str, float]:
    return {}

  def close(self, timeout_s: float) -> bool:
    return True


def start_uploader(config: Any, workdir: str, start_step: int) -> BackupUploader | NoBackup:
  """A BackupUploader for training.backup_url (on process 0 only), or NoBackup when it is empty."""
  import jax  # pylint: disable=import-outside-toplevel
  url = config.training.backup_url
  if not url or jax.process_index() != 0:
    return NoBackup()
  from neon_qtg_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  config_file = os.path.join(workdir, "outputs", "config.json")
  os.makedirs(os.path.dirname(config_file), exist_ok=True)
  with open(config_file, "w", encoding="utf-8") as f:
    json.dump(checkpointing.config_to_json(config), f, indent=1)
  run_files = {name: os.path.join(config.data.data_dir, name) for name in DATA_RUN_FILES}
  run_files["config.json"] = config_file
  log.info("backup: checkpoints are copied to %s in the background", url)
  return BackupUploader(url, checkpointing.checkpoint_dir(workdir), run_files, start_step=start_step)
