"""The background thread that mirrors a run's finalized checkpoints to training.backup_url.

Training never waits for it: a failed upload is logged and retried with backoff; close() gives the
pending uploads a bounded time at the end of a run. Only the writer process runs one (the caller
decides, see training/outputs.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from typing import Any

from neon_qtg_jax.checkpoint import storage
from neon_qtg_jax.checkpoint.checkpointer import checkpoint_dir, config_to_json
from neon_qtg_jax.checkpoint.storage import CHECKPOINTS, FETCH_DIR, INDEX_FILE, RUN_FILES

log = logging.getLogger("neon_qtg_jax")


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

  After a resume from `start_step`, no backup step at or after it is deleted until this uploader
  has uploaded a newer step: until then the backup still holds what the run restored and anything
  newer (for example a step the run could not use), so a crash in between loses nothing. Then backup
  steps after `start_step` that this run did not write (an abandoned branch) go too.
  """

  def __init__(self, url: str, checkpoint_dir: str, run_files: dict[str, str], *, start_step: int = 0,
               poll_seconds: float = 1.0, initial_backoff: float = 1.0, max_backoff: float = 60.0):
    self.url, self.root, self.checkpoint_dir = url, storage.location(url), checkpoint_dir
    self.run_files = dict(run_files)
    self.poll_seconds, self.initial_backoff, self.max_backoff = poll_seconds, initial_backoff, max_backoff
    self.status = BackupStatus()
    self._uploaded: set[int] = set()     # steps this uploader put in the backup (or found complete there)
    self._run_files_done = False
    self._interrupted = False            # a sync failed: partial uploads may be left in the backup
    self._start_step = start_step
    self._newer_uploaded = start_step <= 0   # a step after start_step is in the backup: deletions may begin
    self._written: set[int] = set()          # steps this uploader uploaded
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
      storage.upload_dir(staging, self.root / RUN_FILES)
    shutil.rmtree(staging, ignore_errors=True)
    self._run_files_done = True

  def _may_delete(self, step: int) -> bool:
    return self._newer_uploaded or step < self._start_step

  def _drop_abandoned(self) -> None:
    """Backup steps after the resumed one that this run did not write belong to an abandoned branch."""
    for step in storage.backed_up_steps(self.url):
      if step > self._start_step and step not in self._written:
        log.warning("backup: deleting step %d in %s: the run resumed from the older step %d and has uploaded "
                    "a newer step", step, self.url, self._start_step)
        storage.remove(self.root / CHECKPOINTS / str(step) / INDEX_FILE)
        storage.remove(self.root / CHECKPOINTS / str(step))
    self._start_step = 0

  def sync_once(self) -> None:
    """Uploads run files and every finalized step not yet in the backup, then mirrors local deletions."""
    if not self._run_files_done:
      self._upload_run_files()
      self._uploaded |= set(storage.backed_up_steps(self.url)) & set(self._current_steps())
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
        size = storage.upload_dir(step_dir, self.root / CHECKPOINTS / str(step),
                          {"step": step, "metrics": storage.step_metrics(step_dir), "time": time.time()})
      except FileNotFoundError as err:
        if not str(err.filename or "").startswith(step_dir):
          raise
        log.info("backup: step %d was deleted locally (keep policy) during its upload; skipped", step)
        storage.remove(self.root / CHECKPOINTS / str(step))
        continue
      elapsed = time.perf_counter() - start
      self._uploaded.add(step)
      self._written.add(step)
      with self._lock:
        self.status.last_step = max(self.status.last_step, step)
        self.status.megabytes += size / 2**20
        self.status.seconds += elapsed
        self.status.pending = len([s for s in self._current_steps() if s not in self._uploaded])
      log.info("backup: step %d uploaded to %s (%.1f MB in %.1f s)", step, self.url, size / 2**20, elapsed)
    if not self._newer_uploaded and any(s > self._start_step for s in self._written):
      self._newer_uploaded = True
      self._drop_abandoned()
    kept = set(self._current_steps())
    if not kept:
      return
    for step in sorted(s for s in self._uploaded - kept if self._may_delete(s)):  # the kept steps are backed up
      storage.remove(self.root / CHECKPOINTS / str(step) / INDEX_FILE)
      storage.remove(self.root / CHECKPOINTS / str(step))
      self._uploaded.discard(step)
      log.info("backup: step %d deleted from %s (no longer kept locally)", step, self.url)
    if self._interrupted:  # an upload cut short left files without an index: remove those of gone steps
      for path in storage.uncached(self.root / CHECKPOINTS).iterdir():
        if (path.name.isdigit() and int(path.name) not in kept and self._may_delete(int(path.name))
            and not (path / INDEX_FILE).exists()):
          storage.remove(path)
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
  """A BackupUploader for training.backup_url, or NoBackup when it is empty. Call it on the writer only."""
  url = config.training.backup_url
  if not url:
    return NoBackup()
  config_file = os.path.join(workdir, "outputs", "config.json")
  os.makedirs(os.path.dirname(config_file), exist_ok=True)
  with open(config_file, "w", encoding="utf-8") as f:
    json.dump(config_to_json(config), f, indent=1)
  run_files = {name: os.path.join(config.data.data_dir, name) for name in storage.DATA_RUN_FILES}
  run_files["config.json"] = config_file
  log.info("backup: checkpoints are copied to %s in the background", url)
  return BackupUploader(url, checkpoint_dir(workdir), run_files, start_step=start_step)
