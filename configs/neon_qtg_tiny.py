"""Tiny CPU default: d=64, 4 layers, trained on the Python standard library in minutes."""

from neon_qtg_jax.config import default_config


def get_config():
  return default_config()
