"""Checkpoints through Orbax's CheckpointManager: layout, save, restore with fallback, params-only reads.

Layout (docs/TRAINING.md): `{workdir}/checkpoints/{step}/` holds one Orbax composite per step:

  params/     parameters as a nested dict of float32 arrays (nnx.State.to_pure_dict() layout)
  opt_state/  the optax state
  meta/       JSON: step, rng (uint32 key data), counters, best validation loss
  data/       the Grain iterator state (present when training from the data loader)
  config/     JSON: the resolved run config

Each item restores on its own, so evaluation and sampling read `params` alone. Steps are
kept by Orbax's preservation policy: the last `keep_checkpoints` plus the best by `val_loss`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from neon_qtg_jax.config import complete_saved_config
from neon_qtg_jax.parallel.decisions import all_succeeded
from neon_qtg_jax.training.save_faults import CheckpointSaveError, free_space_warning
from neon_qtg_jax.training import backup

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "val_loss"


def checkpoint_nbytes(*trees: Any) -> int:
  """Bytes of the arrays in `trees` (an upper bound of the checkpoint's size on disk before compression)."""
  return sum(getattr(x, "nbytes", 0) for tree in trees for x in jax.tree.leaves(tree))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def make_manager(directory: str, *, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """CheckpointManager for `directory` (a run's checkpoints/): async, atomic, keeps the last `keep` plus the best."""
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_metric, best_mode="min", preservation_policy=None if read_only else policy,
      enable_async_checkpointing=not read_only, read_only=read_only, create=not read_only,
      save_interval_steps=0 if read_only else 1)
  return ocp.CheckpointManager(directory, options=options)


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return config.to_dict()


def config_from_json(data: dict[str, Any]) -> ml_collections.ConfigDict:
  """Inverse of config_to_json: JSON lists come back as the tuples the schema uses."""
  def tuples(value: Any) -> Any:
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value
  return complete_saved_config(ml_collections.ConfigDict(tuples(data)))


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """A resolved checkpoint: the manager directory and the step inside it."""
  directory: str
  step: int

  @property
  def path(self) -> str:
    return os.path.join(self.directory, str(self.step))


def _manager_directory(workdir_or_path: str) -> tuple[str, int | None]:
  """A workdir, its checkpoints/ dir, or one step dir -> (manager dir, step or None)."""
  path = epath.Path(os.path.abspath(workdir_or_path))
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
  if (path / CHECKPOINT_DIR).is_dir():
    return str(path / CHECKPOINT_DIR), None
  if path.name.isdigit() and (path / "params").exists():
    return str(path.parent), int(path.name)
  return str(path), None


def resolve(workdir_or_path: str, which: str | int = "latest") -> CheckpointRef:
  """Finds one checkpoint. which: a step number, "best", "latest" or a path (then workdir_or_path is ignored).

  A backup URL (s3://bucket/run, or .../checkpoints/{step}) as either argument is downloaded first
  (backup.localize) and its checksums checked.

  Raises FileNotFoundError naming the directory when nothing matches.
  """
  which = str(which)
  if backup.is_url(which):  # a backup URL: a verified local copy of the step
    which = backup.localize(which)
  elif backup.is_url(workdir_or_path):
    workdir_or_path = backup.localize(workdir_or_path, which)
  if which not in ("best", "latest") and not which.isdigit():
    directory, step = _manager_directory(which)
    if step is None:
      return resolve(directory, "latest")
    return CheckpointRef(directory, step)
  directory, step = _manager_directory(workdir_or_path)
  if step is not None:
    return CheckpointRef(directory, step)
  manager = make_manager(directory, read_only=True)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {directory}")
    if which == "best":
      step = manager.best_step()
      if step is None:  # no step has a validation loss yet
        log.warning("no checkpoint in %s has a validation loss; using the latest as the best", directory)
        step = manager.latest_step()
    elif which == "latest":
      step = manager.latest_step()
    else:
      step = int(which)
      if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; have steps {sorted(steps)}")
  finally:
    manager.close()
  return CheckpointRef(directory, step)


def _restore_items(ref: CheckpointRef, items: dict[str, ocp.args.CheckpointArgs]) -> ocp.args.Composite:
  manager = make_manager(ref.directory, read_only=True)
  try:
    return manager.restore(ref.step, args=ocp.args.Composite(**items))
  finally:
    manager.close()


def abstract_params(state: nnx.State) -> dict[str, Any]:
  """Params (nnx.State, concrete or abstract) -> the pure-dict target Orbax restores into."""
  def to_abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(to_abstract, nnx.filter_state(state, nnx.Param).to_pure_dict())


def restore_params(workdir_or_path: str, which: str | int, abstract_model_state: nnx.State) -> tuple[nnx.State, int]:
  """Reads the parameters of one checkpoint, nothing else: (params nnx.State, step).

  abstract_model_state: the model's state (e.g. `nnx.state(nnx.eval_shape(lambda: QTGModel(...)))`),
  whose Param leaves give shapes, dtypes and shardings. which: step, "best", "latest" or a path.
  """
  ref = resolve(workdir_or_path, which)
  params_state = nnx.filter_state(abstract_model_state, nnx.Param)
  restored = _restore_items(ref, {"params": ocp.args.StandardRestore(abstract_params(params_state))})
  state = jax.tree.map(lambda x: x, params_state)  # a copy whose leaves are replaced below
  nnx.replace_by_pure_dict(state, restored["params"])
  return state, ref.step


def load_run_config(workdir_or_path: str, which: str | int = "latest") -> ml_collections.ConfigDict:
  """The resolved config saved with a checkpoint (default: the latest one of the run)."""
  ref = resolve(workdir_or_path, which)
  restored = _restore_items(ref, {"config": ocp.args.JsonRestore()})
  return config_from_json(restored["config"])


def load_meta(workdir_or_path: str, which: str | int = "latest") -> dict[str, Any]:
  """The host bookkeeping saved with a checkpoint: step, best_val_loss, train_seconds, counters."""
  ref = resolve(workdir_or_path, which)
  return dict(_restore_items(ref, {"meta": ocp.args.JsonRestore()})["meta"])


class Checkpointer:
  """Saves and restores full training checkpoints in one directory (a run's checkpoints/)."""

  def __init__(self, directory: str, keep: int, on_save_error: str = "stop"):
    self.directory = os.path.abspath(directory)
    self.manager = make_manager(self.directory, keep=keep)
    self.on_save_error = on_save_error  # "stop": raise CheckpointSaveError; "continue": log it and go on
    self.pending: int | None = None     # the step whose asynchronous save may still be running

  def _save_failed(self, step: int | None, err: Exception) -> None:
    """Raises (or with on_save_error="continue", logs) a clear error for a failed save of `step`."""
    intact = [s for s in self.steps() if s != step]
    reason = str(err).splitlines()[0] if str(err) else ""
    if len(reason) > 400:  # TensorStore's messages put the OS reason ("File too large") last
      reason = f"{reason[:150]} ... {reason[-250:]}"
    message = (f"checkpoint {step} could not be written to {self.directory} ({type(err).__name__}: {reason}); "
               f"earlier checkpoints {intact} are intact")
    if self.on_save_error == "continue":
      log.error("%s; training goes on (training.on_save_error='continue')", message)
      return
    raise CheckpointSaveError(message + "; stopping (training.on_save_error='stop')") from err

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, *, params: nnx.State, opt_state: Any, meta: dict[str, Any],
           config: ml_collections.ConfigDict, data_args: ocp.args.CheckpointArgs | None = None,
           val_loss: float | None = None) -> None:
    """Starts an asynchronous save of `step`; Orbax writes to a temporary dir and renames it when complete."""
    items = {
        "params": ocp.args.StandardSave(params.to_pure_dict()),
        "opt_state": ocp.args.StandardSave(opt_state),
        "meta": ocp.args.JsonSave(meta),
        "config": ocp.args.JsonSave(config_to_json(config)),
    }
    if data_args is not None:
      items["data"] = data_args
    metrics = {BEST_METRIC: float(val_loss)} if val_loss is not None else None
    warning = free_space_warning(self.directory, checkpoint_nbytes(params, opt_state))
    if warning:
      log.warning("before checkpoint %d: %s", step, warning)
    self.wait()  # a failed previous save is reported with its own step
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
      self.pending = step
    except Exception as err:  # noqa: BLE001 - Orbax and TensorStore raise ValueError, OSError, ...
      self._save_failed(step, err)

  def restore(self, step: int, *, params: nnx.State, opt_state: Any,
              data_args: ocp.args.CheckpointArgs | None = None) -> dict[str, Any]:
    """Restores one step into the shapes of the given (abstract or concrete) params and opt_state.

    Returns {"params": nnx.State, "opt_state", "meta", "data" (when requested)}.
    """
    abstract_opt = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), opt_state)
    items = {
        "params": ocp.args.StandardRestore(abstract_params(params)),
        "opt_state": ocp.args.StandardRestore(abstract_opt),
        "meta": ocp.args.JsonRestore(),
    }
    if data_args is not None:
      items["data"] = data_args
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = jax.tree.map(lambda x: x, nnx.filter_state(params, nnx.Param))
    nnx.replace_by_pure_dict(state, restored["params"])
    # Orbax gives plain tuples for optax's NamedTuples: put the leaves back into the original structure.
    opt = jax.tree.unflatten(jax.tree.structure(opt_state), jax.tree.leaves(restored["opt_state"]))
    out = {"params": state, "opt_state": opt, "meta": restored["meta"]}
    if data_args is not None:
      out["data"] = restored["data"]
    return out

  def restore_latest_good(self, candidates: list[int], **kwargs) -> tuple[int, dict[str, Any]] | None:
    """Tries the steps newest first; an unreadable one is moved aside (see move_aside) and the previous one used."""
    for step in sorted(candidates, reverse=True):
      restored, reason = None, "unreadable on another process"
      try:
        restored = self.restore(step, **kwargs)
      except Exception as err:  # noqa: BLE001 - any read failure means: fall back to the previous step
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
      if all_succeeded(restored is not None):  # every process falls back together
        return step, restored
      if jax.process_index() == 0:  # one process renames the shared directory
        kept = self.move_aside(step)
        log.warning("checkpoint %s/%d is unreadable (%s); moved to %s, not deleted; falling back to the "
                    "previous one", self.directory, step, reason, kept)
    return None

  def move_aside(self, step: int) -> str:
    """Renames step's directory to `{step}.unreadable` (then .1, .2, ...): kept for the user, out of Orbax's view.

    Orbax lists only directories named by a step number, so the renamed one is never restored,
    counted in keep-K rotation or deleted by it; a new save of the same step does not collide.
    """
    source = os.path.join(self.directory, str(step))
    target, n = f"{source}.unreadable", 0
    while os.path.exists(target):
      n += 1
      target = f"{source}.unreadable.{n}"
    os.rename(source, target)
    self.manager.reload()
    return target

  def delete_after(self, step: int) -> None:
    """Removes checkpoints newer than `step` (resuming from an older step starts a new branch there)."""
    for later in self.steps():
      if later > step:
        log.warning("deleting checkpoint step %d: resuming from the older step %d", later, step)
        self.manager.delete(later)

  def wait(self) -> None:
    """Waits for the running save; its failure is raised (or logged) as CheckpointSaveError naming the step."""
    try:
      self.manager.wait_until_finished()
    except Exception as err:  # noqa: BLE001
      self._save_failed(self.pending, err)
    finally:
      self.pending = None

  def check(self) -> None:
    """Reports a finished asynchronous save's failure now (as in wait) without waiting for a running one."""
    if self.pending is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
