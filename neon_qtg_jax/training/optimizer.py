"""AdamW with linear warmup then cosine decay, global-norm clipping, weight decay on matrices only."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def warmup_steps(training_cfg: ml_collections.ConfigDict) -> int:
  """The schedule's warmup: training.warmup_steps clamped to the run's total_steps (a short run of a config
  made for a long one, e.g. --config.training.total_steps=20 with warmup_steps 50)."""
  return min(training_cfg.warmup_steps, training_cfg.total_steps)


def schedule_note(training_cfg: ml_collections.ConfigDict) -> str | None:
  """The line the trainer logs when the warmup fills the whole run (no cosine decay), else None."""
  t = training_cfg
  if t.warmup_steps < t.total_steps:
    return None
  clamped = (f" (training.warmup_steps={t.warmup_steps} clamped to the run's steps)"
             if t.warmup_steps > t.total_steps else "")
  return (f"learning rate: the warmup takes all {t.total_steps} steps{clamped}: linear from 0 to training.lr={t.lr:g}, "
          f"no cosine decay to training.end_lr")


def learning_rate_schedule(training_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """0 at step 0, linear to `lr` at `warmup_steps`, cosine to `end_lr` at `total_steps`, flat after.

  With warmup_steps >= total_steps the warmup is the whole run (warmup_steps() clamps it): linear from 0
  to `lr` at total_steps, flat after (schedule_note says so in the log). Otherwise optax's schedule as is.
  """
  t = training_cfg
  warmup = warmup_steps(t)
  if warmup >= t.total_steps:  # optax's cosine part needs decay_steps > warmup_steps
    return optax.linear_schedule(init_value=0.0, end_value=t.lr, transition_steps=warmup)
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=t.lr, warmup_steps=warmup,
                                            decay_steps=t.total_steps, end_value=t.end_lr)


def _layer_axes(path: tuple[Any, ...]) -> int:
  """Stacked blocks carry one leading layer axis that is not a matrix dimension."""
  first = path[0]
  return 1 if getattr(first, "key", getattr(first, "name", None)) == "blocks" else 0


def weight_decay_mask(params: Any) -> Any:
  """True for matrices (kernels, embedding and position tables); False for norms, gamma and biases."""
  def decays(path, x) -> bool:
    name = [p.key for p in path if hasattr(p, "key")][-1]  # the parameter's own name
    return x.ndim - _layer_axes(path) >= 2 and name != "bias"  # the QKV bias is head-shaped (3, H, hd)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(training_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  t = training_cfg
  return optax.chain(
      optax.clip_by_global_norm(t.max_grad_norm),
      optax.adamw(learning_rate_schedule(t), b1=t.beta1, b2=t.beta2, eps=t.adam_eps,
                  weight_decay=t.weight_decay, mask=weight_decay_mask, mu_dtype=t.mu_dtype),
  )
