"""Checkpoints through Orbax's CheckpointManager: layout, save, checked restore, params-only reads.

Layout (docs/TRAINING.md): `{workdir}/checkpoints/{step}/` holds one Orbax composite per step:

  params/     parameters as a nested dict of float32 arrays (nnx.State.to_pure_dict() layout)
  opt_state/  the optax state
  meta/       JSON: step, rng (uint32 key data), counters, best validation loss
  data/       the Grain iterator state (present when training from the data loader)
  config/     JSON: the resolved run config
  tokenizer/  JSON: the run's tokenizer (data.data_dir's tokenizer.model, base64, and tokenizer.json), so a
              copied workdir serves, samples and evaluates without the data directory (inference/restore.py)

Each item restores on its own, so evaluation and sampling read `params` alone. Steps are
kept by Orbax's preservation policy: the last `keep_checkpoints` plus the best by `val_loss`.

A restore first compares the arrays the checkpoint holds (Orbax metadata, nothing read) with the
run's: a checkpoint of another model shape is a CheckpointMismatchError naming the parameter and
the config fields that differ, and is left where it is; only a checkpoint whose data cannot be read
is moved aside. Every step carries a sha256 per file, recorded when it was committed
(integrity.py): a restore checks the files of the items it reads first, and the parameters it read
for NaN and infinity; either failure makes the step unreadable.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from neon_qtg_jax.checkpoint import integrity, storage
from neon_qtg_jax.checkpoint.errors import CheckpointMismatchError, CheckpointSaveError, free_space_warning
from neon_qtg_jax.config import MODEL_EXECUTION_FIELDS, complete_saved_config
from neon_qtg_jax.parallel import decisions

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DEFAULT_SAVE_TIMEOUT_MINUTES = 20.0  # Orbax's own default
BEST_METRIC = "val_loss"
TOKENIZER_ITEM = "tokenizer"


def checkpoint_nbytes(*trees: Any) -> int:
  """Bytes of the arrays in `trees` (an upper bound of the checkpoint's size on disk before compression)."""
  return sum(getattr(x, "nbytes", 0) for tree in trees for x in jax.tree.leaves(tree))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


class _DropReadOnlyNotice(logging.Filter):
  """Drops Orbax's warning that a manager is read only: make_manager(read_only=True) asks for it (evaluation,
  sampling, analysis), so the warning says nothing, and it was logged several times per run."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


def make_manager(directory: str, *, keep: int = 3, read_only: bool = False,
                 timeout_minutes: float = DEFAULT_SAVE_TIMEOUT_MINUTES) -> ocp.CheckpointManager:
  """CheckpointManager for `directory` (a run's checkpoints/): async, atomic, keeps the last `keep` plus the best.

  timeout_minutes: how long a background save may take, the processes' wait for each other at its
  end included (Orbax's AsyncOptions.timeout_secs). A process whose writes failed never reaches
  that barrier: the others then fail this save after timeout_minutes, so every process sees it.
  """
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_metric, best_mode="min", preservation_policy=None if read_only else policy,
      enable_async_checkpointing=not read_only, read_only=read_only, create=not read_only,
      save_interval_steps=0 if read_only else 1,
      temporary_path_class=None if read_only else integrity.ChecksummedTemporaryPath,  # checksums.json at commit
      async_options=ocp.AsyncOptions(timeout_secs=max(1, round(60 * timeout_minutes)),
                                     barrier_sync_fn=decisions.SaveBarrier() if jax.process_count() > 1 else None))
  if not read_only:
    return ocp.CheckpointManager(directory, options=options)
  notice = _DropReadOnlyNotice()
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(notice)
  try:
    return ocp.CheckpointManager(directory, options=options)
  finally:
    absl_logger.removeFilter(notice)


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
  (storage.localize) and its checksums checked.

  Raises FileNotFoundError naming the directory when nothing matches.
  """
  which = str(which)
  if storage.is_url(which):  # a backup URL: a verified local copy of the step
    which = storage.localize(which)
  elif storage.is_url(workdir_or_path):
    workdir_or_path = storage.localize(workdir_or_path, which)
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
  """The items of one step, their files checked against the checksums recorded at its commit first."""
  integrity.verify(ref.path, items)
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
  target = abstract_params(params_state)
  differs = array_mismatch(ref.path, "params", target)
  if differs:
    raise CheckpointMismatchError(f"checkpoint {ref.path} does not fit the model: {differs}")
  restored = _restore_items(ref, {"params": ocp.args.StandardRestore(target)})
  integrity.check_finite(restored["params"], ref.path)
  state = jax.tree.map(lambda x: x, params_state)  # a copy whose leaves are replaced below
  nnx.replace_by_pure_dict(state, restored["params"])
  return state, ref.step


def load_run_config(workdir_or_path: str, which: str | int = "latest") -> ml_collections.ConfigDict:
  """The resolved config saved with a checkpoint (default: the latest one of the run)."""
  ref = resolve(workdir_or_path, which)
  restored = _restore_items(ref, {"config": ocp.args.JsonRestore()})
  return config_from_json(restored["config"])


def tokenizer_item(data_dir: str) -> dict[str, Any] | None:
  """data_dir's tokenizer as the JSON checkpoint item {"model_base64", "info"}; None where data_dir has none."""
  import base64
  import json
  model, info = os.path.join(data_dir, "tokenizer.model"), os.path.join(data_dir, "tokenizer.json")
  if not (os.path.exists(model) and os.path.exists(info)):
    return None
  with open(model, "rb") as f, open(info, encoding="utf-8") as g:
    return {"model_base64": base64.b64encode(f.read()).decode("ascii"), "info": json.load(g)}


def load_tokenizer_item(workdir_or_path: str, which: str | int = "latest") -> dict[str, Any] | None:
  """The tokenizer item saved with a checkpoint (tokenizer_item), or None for a checkpoint saved without one."""
  ref = resolve(workdir_or_path, which)
  if not os.path.isdir(os.path.join(ref.path, TOKENIZER_ITEM)):
    return None
  return dict(_restore_items(ref, {TOKENIZER_ITEM: ocp.args.JsonRestore()})[TOKENIZER_ITEM])


def load_meta(workdir_or_path: str, which: str | int = "latest") -> dict[str, Any]:
  """The host bookkeeping saved with a checkpoint: step, best_val_loss, train_seconds, counters."""
  ref = resolve(workdir_or_path, which)
  return dict(_restore_items(ref, {"meta": ocp.args.JsonRestore()})["meta"])




def _key_text(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def saved_arrays(step_dir: str, item: str) -> list[tuple[str, tuple[int, ...]]]:
  """(path, shape) of every array an item of a step directory holds, from Orbax's metadata (no data read)."""
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / item)
  tree = getattr(metadata, "tree", metadata)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return [(_key_text(path), tuple(leaf.shape)) for path, leaf in leaves]


def array_mismatch(step_dir: str, item: str, target: Any) -> str | None:
  """How the arrays saved under `item` differ from `target`'s (shapes of a pytree), or None when they fit.

  Compares the leaves in order (Orbax restores optax's NamedTuples as plain tuples, so only the
  order and shapes carry over); names the first differing leaf by the target's path.
  """
  saved = saved_arrays(step_dir, item)
  wanted = [(_key_text(path), tuple(leaf.shape))
            for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]]
  for (saved_path, saved_shape), (path, shape) in zip(saved, wanted):
    if saved_shape != shape:
      return f"{item} {path} is {saved_shape} in the checkpoint and {shape} in this run"
  if len(saved) != len(wanted):
    extra = [p for p, _ in (saved[len(wanted):] or wanted[len(saved):])][:3]
    where = "only the checkpoint" if len(saved) > len(wanted) else "only this run"
    return (f"{item} holds {len(saved)} arrays in the checkpoint and {len(wanted)} in this run "
            f"(in {where}: {', '.join(extra)})")
  return None


def config_differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict, section: str
                       ) -> list[str]:
  """'model.mlp_ratio = 4 here, 2 in the checkpoint' for every field of `section` that differs.

  Model fields that only choose how the forward pass is computed (config.MODEL_EXECUTION_FIELDS)
  are left out: they change no array.
  """
  out = []
  ours, theirs = current[section].to_dict(), saved.get(section, ml_collections.ConfigDict()).to_dict()
  for name in sorted(set(ours) | set(theirs)):
    if section == "model" and name in MODEL_EXECUTION_FIELDS:
      continue
    mine, old = ours.get(name), theirs.get(name)
    if isinstance(mine, tuple) and isinstance(old, list):
      old = tuple(old)
    if mine != old:
      out.append(f"{section}.{name} = {mine!r} here, {old!r} in the checkpoint")
  return out


def os_error_text(message: str) -> str:
  """The first operating-system error text (an os.strerror, e.g. "File too large") in message; '' if none."""
  found = [(message.find(text), text) for text in {os.strerror(code) for code in errno.errorcode} if text in message]
  return min(found)[1] if found else ""


class Checkpointer:
  """Saves and restores full training checkpoints in one directory (a run's checkpoints/)."""

  def __init__(self, directory: str, keep: int, on_save_error: str = "stop", read_only: bool = False,
               timeout_minutes: float = DEFAULT_SAVE_TIMEOUT_MINUTES):
    self.directory = os.path.abspath(directory)
    self.manager = make_manager(self.directory, keep=keep, read_only=read_only, timeout_minutes=timeout_minutes)
    self.on_save_error = on_save_error  # "stop": raise CheckpointSaveError; "continue": log it and go on
    self.pending: int | None = None     # the step whose asynchronous save may still be running
    self._tokenizer: dict[str, Any] | None = None  # the item saved with every step (tokenizer_item)

  def _save_failed(self, step: int | None, err: Exception) -> None:
    """Raises (or with on_save_error="continue", logs) a clear error for a failed save of `step`."""
    intact = [s for s in self.steps() if s != step]
    reason = str(err).splitlines()[0] if str(err) else ""
    if len(reason) > 400:  # TensorStore's messages repeat the store's whole spec
      reason = f"{reason[:150]} ... {reason[-250:]}"
    cause = os_error_text(str(err))
    if cause and cause not in reason:  # the OS reason ("File too large") can sit in what was cut, or on a later line
      reason += f" [{cause}]"
    if isinstance(err, TimeoutError):
      reason += (" another process did not finish its part in time (training.save_timeout_minutes); its own error "
                 "names the cause")
    message = (f"checkpoint {step} could not be written to {self.directory} ({type(err).__name__}: {reason}); "
               f"earlier checkpoints {intact} are intact")
    if self.on_save_error == "continue":
      log.error("%s; training goes on (training.on_save_error='continue')", message)
      return
    raise CheckpointSaveError(message + "; stopping (training.on_save_error='stop')", message) from err

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
    if self._tokenizer is None:  # read once: a run's tokenizer does not change
      data_dir = config.get("data", {}).get("data_dir")  # a config without data (tests, tools) saves none
      self._tokenizer = (tokenizer_item(data_dir) if data_dir else None) or {}
    if self._tokenizer:
      items[TOKENIZER_ITEM] = ocp.args.JsonSave(self._tokenizer)
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

  def mismatch(self, step: int, *, params: nnx.State, opt_state: Any,
               config: ml_collections.ConfigDict | None = None) -> str | None:
    """Why step's arrays do not fit `params` / `opt_state` (naming the config fields that differ), or None.

    Reads Orbax's metadata only; raises like a restore when that cannot be read.
    """
    step_dir = os.path.join(self.directory, str(step))
    for item, target, section in (("params", abstract_params(params), "model"),
                                  ("opt_state", opt_state, "training")):
      differs = array_mismatch(step_dir, item, target)
      if differs is None:
        continue
      fields = []
      if config is not None:
        try:
          saved = config_from_json(self.manager.restore(step, args=ocp.args.Composite(
              config=ocp.args.JsonRestore()))["config"])
          fields = config_differences(saved, config, section)
        except Exception as err:  # noqa: BLE001 - the arrays differ whatever the config item holds
          fields = [f"the saved config cannot be read ({type(err).__name__})"]
      cause = ("; ".join(fields[:5]) if fields else
               f"no {section}.* field differs from the saved config: the checkpoint was written by other code")
      return (f"checkpoint {step} in {self.directory} does not fit this run: {differs} ({cause}); "
              "resume with the config it was written with, or start in another workdir (nothing was moved)")
    return None

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
    step_dir = os.path.join(self.directory, str(step))
    integrity.verify(step_dir, items)  # ChecksumMismatch: an unreadable step (try_restore moves it aside)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    integrity.check_finite(restored["params"], step_dir)
    state = jax.tree.map(lambda x: x, nnx.filter_state(params, nnx.Param))
    nnx.replace_by_pure_dict(state, restored["params"])
    # Orbax gives plain tuples for optax's NamedTuples: put the leaves back into the original structure.
    opt = jax.tree.unflatten(jax.tree.structure(opt_state), jax.tree.leaves(restored["opt_state"]))
    out = {"params": state, "opt_state": opt, "meta": restored["meta"]}
    if data_args is not None:
      out["data"] = restored["data"]
    return out

  def try_restore(self, step: int, *, params: nnx.State, opt_state: Any,
                  data_args: ocp.args.CheckpointArgs | None = None, config: ml_collections.ConfigDict | None = None,
                  move_unreadable: bool = True) -> dict[str, Any] | None:
    """restore(), told apart by cause and decided by every process together.

    Arrays of other shapes (on any process): CheckpointMismatchError, nothing moved. Data that
    cannot be read (on any process): the step is moved aside (`move_unreadable`) and None returned.
    """
    restored, differs, reason = None, None, "unreadable on another process"
    try:
      differs = self.mismatch(step, params=params, opt_state=opt_state, config=config)
      if differs is None:
        restored = self.restore(step, params=params, opt_state=opt_state, data_args=data_args)
    except Exception as err:  # noqa: BLE001 - any read failure means: fall back to the previous step
      reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    agreed = decisions.agree({"mismatch": differs is not None, "unreadable": differs is None and restored is None})
    if agreed["mismatch"]:
      raise CheckpointMismatchError(differs or f"checkpoint {step} in {self.directory} does not fit this run "
                                    "on another process (its message names the parameter); nothing was moved")
    if not agreed["unreadable"]:
      return restored
    if move_unreadable:
      kept = self.move_aside(step)
      log.warning("checkpoint %s/%d is unreadable (%s); moved to %s, not deleted", self.directory, step, reason,
                  kept or f"{self.directory}/{step}.unreadable")
    else:
      log.warning("checkpoint %s/%d is unreadable (%s)", self.directory, step, reason)
    return None

  def restore_latest_good(self, candidates: list[int], **kwargs) -> tuple[int, dict[str, Any]] | None:
    """Tries the steps newest first; an unreadable one is moved aside (see move_aside) and the previous one used."""
    for step in sorted(candidates, reverse=True):
      restored = self.try_restore(step, **kwargs)
      if restored is not None:
        return step, restored
      log.warning("falling back to the previous checkpoint")
    return None

  def _rename_aside(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
    target, n = f"{source}.unreadable", 0
    while os.path.exists(target):
      n += 1
      target = f"{source}.unreadable.{n}"
    os.rename(source, target)
    return target

  def move_aside(self, step: int) -> str | None:
    """Renames step's directory to `{step}.unreadable` (then .1, .2, ...): kept for the user, out of Orbax's view.

    One process renames, every process waits for it (a barrier), then re-lists the directory; the
    new name on process 0, None on the others. Orbax lists only directories named by a step number,
    so the renamed one is never restored, counted in keep-K rotation or deleted by it; a new save
    of the same step does not collide.
    """
    target = decisions.on_one_process(lambda: self._rename_aside(step), f"move_aside_{step}")
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
