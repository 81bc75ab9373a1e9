"""A run's start: the checkpoint package's resume plan carried out on the train state, the data position and Progress.

Also what a rollback (spike guard) reuses: a TrainState from restored checkpoint items.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from neon_qtg_jax.checkpoint import resume as resume_plan
from neon_qtg_jax.checkpoint import storage
from neon_qtg_jax.checkpoint.checkpointer import Checkpointer
from neon_qtg_jax.parallel import ShardingConfig, decisions, inputs
from neon_qtg_jax.training import train_step as ts

log = logging.getLogger("neon_qtg_jax")


@dataclasses.dataclass
class Progress:
  """Host-side bookkeeping that goes into each checkpoint's meta item."""
  best_val_loss: float = math.inf
  train_seconds: float = 0.0
  lr_scale: float = 1.0                                        # product of the spike guard's learning-rate scales
  rollbacks: list[int] = dataclasses.field(default_factory=list)  # steps of the spike guard's rollbacks

  def meta(self, state: ts.TrainState) -> dict[str, Any]:
    counters = jax.device_get({"step": state.step, "rng": state.rng, "nonfinite_total": state.nonfinite_total,
                               "nonfinite_streak": state.nonfinite_streak, "nonfinite_peak": state.nonfinite_peak})
    return {"step": int(counters["step"]), "rng": np.asarray(counters["rng"]).tolist(),
            "nonfinite_total": int(counters["nonfinite_total"]), "nonfinite_streak": int(counters["nonfinite_streak"]),
            "nonfinite_peak": int(counters["nonfinite_peak"]), "best_val_loss": self.best_val_loss,
            "train_seconds": self.train_seconds, "lr_scale": self.lr_scale, "rollbacks": list(self.rollbacks)}

  @classmethod
  def from_meta(cls, meta: dict[str, Any]) -> "Progress":
    """A checkpoint's bookkeeping (checkpoints written before the spike guard have no lr_scale or rollbacks)."""
    return cls(best_val_loss=meta["best_val_loss"], train_seconds=meta["train_seconds"],
               lr_scale=float(meta.get("lr_scale", 1.0)), rollbacks=[int(s) for s in meta.get("rollbacks", [])])


def iterator_args(train_iter: Any, save: bool) -> Any:
  from neon_qtg_jax.data import loader  # pylint: disable=import-outside-toplevel
  return loader.iterator_save_args(train_iter) if save else loader.iterator_restore_args(train_iter)


def loader_has_state(step_dir: str) -> bool:
  """Whether the step directory holds this process's data position under this process layout."""
  from neon_qtg_jax.data import loader  # pylint: disable=import-outside-toplevel
  index, count = decisions.process_position()
  return loader.has_iterator_state(step_dir, index, count)


def plan(config: ml_collections.ConfigDict, resume_from: str, checkpointer: Checkpointer) -> resume_plan.ResumePlan:
  """The resume plan of this run; restores the backed-up tokenizer first when the plan may use the backup."""
  out = resume_plan.plan_resume(resume_from, checkpointer.directory, config.training.backup_url, checkpointer.steps())
  if any(c.source == resume_plan.BACKUP for c in out.candidates):
    storage.fetch_data_files(config.training.backup_url, config.data.data_dir)
  return out


def state_from_items(target: ts.TrainState, items: dict[str, Any], sharding: ShardingConfig) -> ts.TrainState:
  """The TrainState of restored checkpoint items (params, opt_state, meta) in target's shardings."""
  meta = items["meta"]
  replicated = sharding.replicated()

  def scalar(name: str) -> jax.Array:
    return jax.device_put(jnp.asarray(meta[name], jnp.int32), replicated)

  return target.replace(step=scalar("step"), params=items["params"], opt_state=items["opt_state"],
                        rng=jax.device_put(jnp.asarray(meta["rng"], jnp.uint32), replicated),
                        nonfinite_streak=scalar("nonfinite_streak"), nonfinite_peak=scalar("nonfinite_peak"),
                        nonfinite_total=scalar("nonfinite_total"))


def restore_or_init(config: ml_collections.ConfigDict, args: Any, checkpointer: Checkpointer,
                    target: ts.TrainState, train_iter: Any, sharding: ShardingConfig,
                    init: Callable[[], ts.TrainState], run_plan: resume_plan.ResumePlan | None = None
                    ) -> tuple[ts.TrainState, Progress]:
  """Resumes from the plan's first checkpoint that restores (checkpoint.resume.restore_plan); else `init()`.

  `target` is the abstract, sharded state (ShapeDtypeStructs): Orbax reads every array straight
  into its shards, so a resume never holds a freshly initialised state beside the restored one.
  """
  run_plan = run_plan or plan(config, args.resume_from, checkpointer)
  if run_plan.fresh:
    log.info("no checkpoint in %s: starting from step 0", checkpointer.directory)
    return init(), Progress()

  def data_args(step_dir: str) -> Any:
    return iterator_args(train_iter, save=False) if train_iter is not None and loader_has_state(step_dir) else None

  found = resume_plan.restore_plan(run_plan, checkpointer, data_args=data_args, config=config,
                                   targets={"params": target.params, "opt_state": target.opt_state})
  if found is None:
    return init(), Progress()
  meta = found.items["meta"]
  if train_iter is not None and "data" not in found.items:
    from neon_qtg_jax.data import loader  # pylint: disable=import-outside-toplevel
    global_rows = config.training.batch_size * config.training.grad_accum_steps
    _, count = inputs.process_rows(sharding, global_rows)
    loader.skip_to_step(train_iter, int(meta["step"]), global_rows // count)
    log.info("data position set from step %d: the checkpoint was written under another process layout",
             int(meta["step"]))
  return state_from_items(target, found.items, sharding), Progress.from_meta(meta)
