"""Where a run starts: one ResumePlan from --resume_from, the workdir's checkpoints and the backup, and its execution.

`plan_resume` only lists (nothing is read or fetched): the candidates to try, newest first. With no
--resume_from that is every finalized step of the workdir and every indexed step of
training.backup_url, so the run resumes from the newest intact checkpoint wherever it is; a step
held in both places is tried locally first and then from the backup. `restore_plan` tries them in
order: a backup step is downloaded into the workdir's checkpoints/ (checksums checked) and restored
like a local one; an unreadable step is moved aside and the next candidate tried; a step whose
arrays do not fit the run is an error (checkpointer.CheckpointMismatchError), nothing moved.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

from neon_qtg_jax.checkpoint import storage
from neon_qtg_jax.checkpoint.checkpointer import Checkpointer, resolve
from neon_qtg_jax.checkpoint.errors import BackupError, CheckpointUnreadableError
from neon_qtg_jax.parallel import decisions

log = logging.getLogger("neon_qtg_jax")

LOCAL, BACKUP, PATH = "local", "backup", "path"


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One checkpoint to try: a step of the workdir (LOCAL), of the backup (BACKUP), or of a named directory (PATH)."""
  step: int
  source: str
  directory: str   # the Orbax directory holding the step (LOCAL, PATH) or the backup URL (BACKUP)

  def describe(self) -> str:
    return f"{self.directory}/{self.step}" if self.source != BACKUP else f"backup {self.directory} step {self.step}"


@dataclasses.dataclass(frozen=True)
class ResumePlan:
  """The candidates newest first (the first that restores is used); none: start from step 0.

  named: the user named one checkpoint, so an unreadable one is an error, not a fallback.
  branch: the user named an older step of the workdir, so newer local steps are deleted once it restored.
  backup_unread: the backup could not be listed (the run goes on with the local steps; the warning says so).
  """
  candidates: tuple[Candidate, ...]
  named: bool = False
  branch: bool = False
  backup_unread: bool = False

  @property
  def fresh(self) -> bool:
    return not self.candidates


def _merged(local: list[int], backed_up: list[int], checkpoint_dir: str, url: str) -> tuple[Candidate, ...]:
  """Every step newest first; a step held in both places: the local copy, then the backup's."""
  out = []
  for step in sorted(set(local) | set(backed_up), reverse=True):
    if step in local:
      out.append(Candidate(step, LOCAL, checkpoint_dir))
    if step in backed_up:
      out.append(Candidate(step, BACKUP, url))
  return tuple(out)


def plan_resume(resume_from: str, checkpoint_dir: str, backup_url: str, local_steps: list[int]) -> ResumePlan:
  """The plan for --resume_from (a step, "best", "latest", "backup", a path or URL; empty: automatic).

  local_steps: the finalized steps of checkpoint_dir (Checkpointer.steps()). Raises FileNotFoundError
  for a named checkpoint that does not exist, BackupError when the workdir has no checkpoint and
  the backup cannot be listed (starting from 0 could overwrite a run the backup holds).
  """
  if resume_from == "backup" and not backup_url:
    raise FileNotFoundError("--resume_from=backup: config field training.backup_url is empty")
  if resume_from == "backup":
    steps = storage.backed_up_steps(backup_url)
    if not steps:
      raise FileNotFoundError(f"--resume_from=backup: no backed-up checkpoint in {backup_url}")
    return ResumePlan(tuple(Candidate(s, BACKUP, backup_url) for s in sorted(steps, reverse=True)))
  if resume_from in ("latest", "best") or resume_from.isdigit():
    if not local_steps:
      raise FileNotFoundError(f"--resume_from={resume_from}: no checkpoints in {checkpoint_dir}")
    step = resolve(checkpoint_dir, resume_from).step
    return ResumePlan((Candidate(step, LOCAL, checkpoint_dir),), named=True, branch=step < max(local_steps))
  if resume_from:
    ref = resolve(resume_from, resume_from)  # a path, or a backup URL fetched and verified
    same = os.path.abspath(ref.directory) == os.path.abspath(checkpoint_dir)
    return ResumePlan((Candidate(ref.step, LOCAL if same else PATH, ref.directory),), named=True,
                      branch=same and ref.step < max(local_steps, default=ref.step))
  if not backup_url:
    return ResumePlan(tuple(Candidate(s, LOCAL, checkpoint_dir) for s in sorted(local_steps, reverse=True)))
  try:
    backed_up = storage.backed_up_steps(backup_url)
  except Exception as err:  # noqa: BLE001 - unreachable or unreadable storage
    if not local_steps:
      raise BackupError(f"cannot read the backup {backup_url} ({type(err).__name__}: {err}); the workdir has no "
                        "checkpoint, so the backup decides whether this run resumes") from err
    log.warning("backup: cannot list %s (%s: %s); resuming from the workdir's checkpoints only, and no backup "
                "step is deleted until a newer one is uploaded", backup_url, type(err).__name__, err)
    return ResumePlan(_merged(local_steps, [], checkpoint_dir, backup_url), backup_unread=True)
  return ResumePlan(_merged(local_steps, backed_up, checkpoint_dir, backup_url))


def fetch_into(checkpointer: Checkpointer, url: str, step: int) -> bool:
  """Puts backup step `step` into the run's checkpoint directory, verified; True on every process if it worked.

  Process 0 downloads ({step}.partial, renamed when every file matched); a local directory of the
  same step that was not restored is kept under {step}.before_backup.
  """
  def fetch() -> str | None:
    local = os.path.join(checkpointer.directory, str(step))
    if os.path.exists(local):
      kept = f"{local}.before_backup"
      os.rename(local, kept if not os.path.exists(kept) else f"{kept}.{os.getpid()}")
    try:
      storage.fetch_step(url, step, checkpointer.directory)
      return None
    except Exception as err:  # noqa: BLE001 - a missing or changed file, or the store went away
      return f"{type(err).__name__}: {err}"

  problem = decisions.on_one_process(fetch, f"fetch_backup_{step}")
  if problem:
    log.warning("backup step %d of %s is unusable (%s)", step, url, problem)
  ok = decisions.all_succeeded(problem is None)
  checkpointer.manager.reload()
  return ok


@dataclasses.dataclass
class RestoredCheckpoint:
  """The outcome of restore_plan: the step, where it came from, and Checkpointer.restore()'s items."""
  step: int
  candidate: Candidate
  items: dict[str, Any]


def restore_plan(plan: ResumePlan, checkpointer: Checkpointer, *, targets: dict[str, Any],
                 data_args: Callable[[str], Any], config: Any) -> RestoredCheckpoint | None:
  """Tries the plan's candidates in order; the first that restores, or None (start from step 0).

  targets: params and opt_state to restore into (abstract, sharded); data_args(step_dir): the data
  iterator's restore args for that step directory, or None to leave the iterator alone. Every
  process takes the same path (the checks are agreed). Raises CheckpointUnreadableError when a named
  checkpoint is unreadable, CheckpointMismatchError when a checkpoint does not fit the run.
  """
  fetched_failed: set[int] = set()
  for candidate in plan.candidates:
    source = checkpointer
    if candidate.source == BACKUP:
      if candidate.step in fetched_failed or not fetch_into(checkpointer, candidate.directory, candidate.step):
        continue
    elif candidate.source == PATH:
      source = Checkpointer(candidate.directory, keep=1, read_only=True)
    step_dir = os.path.join(source.directory, str(candidate.step))
    restored = source.try_restore(candidate.step, **targets, data_args=data_args(step_dir), config=config,
                                  move_unreadable=source is checkpointer)
    if source is not checkpointer:
      source.close()
    if restored is not None:
      if plan.branch:
        checkpointer.delete_after(candidate.step)
      log.info("resumed from %s/%d%s", source.directory, candidate.step,
               " (fetched from the backup, checksums matched)" if candidate.source == BACKUP else "")
      return RestoredCheckpoint(candidate.step, candidate, restored)
    if plan.named:
      raise CheckpointUnreadableError(f"checkpoint {candidate.describe()} is unreadable (see the warning above)")
    log.warning("checkpoint %s unusable: falling back to the next candidate", candidate.describe())
  if plan.candidates:
    log.warning("no readable checkpoint among %s: starting from step 0",
                ", ".join(c.describe() for c in plan.candidates))
  return None
