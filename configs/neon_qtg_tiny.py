"""Tiny CPU default: d=64, 4 layers, trained on the Python standard library in minutes."""

from neon_qtg_jax.config import default_config


def get_config():
  c = default_config()
  # A fixed number of steps, training.total_steps = 600 (the schedule's length), and no wall-clock cap, so the
  # README's main job trains the same model on an idle machine and a busy one: about 4 minutes of training on
  # 2 idle cores (0.34 s a step), longer under load. --config.training.max_train_minutes=N caps the time
  # instead (the run then stops early, evaluated, sampled and saved, at a step that depends on the load).
  c.training.total_steps = 600
  c.training.max_train_minutes = 0.0
  return c
