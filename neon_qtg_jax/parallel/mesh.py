"""The ("data", "fsdp") device mesh: batches split over both axes, parameters over "fsdp"."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp")


def make_mesh(fsdp: int | None = None, devices: list[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all); fsdp defaults to every device (pure FSDP)."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp = len(devices) if fsdp is None else fsdp
  if fsdp <= 0 or len(devices) % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the number of devices ({len(devices)})")
  return Mesh(np.array(devices).reshape(len(devices) // fsdp, fsdp), MESH_AXES)
