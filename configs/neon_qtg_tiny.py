"""Tiny CPU default: d=64, 4 layers, trained on the Python standard library in minutes."""

from neon_qtg_jax.config import default_config


def get_config():
  c = default_config()
  # 600 steps take about 6-7 minutes on 2 idle cores; on busy cores the run stops here instead,
  # evaluated, sampled and saved, so data preparation plus training stay within 10 minutes.
  c.training.max_train_minutes = 7.5
  return c
