"""Compile targets: the local devices, or a described accelerator compiled for without one attached.

`--target=h200:N` gives N H200 devices from XLA's compile-only GPU client (the `cuda12` extra's
plugin): N <= 8 is one host with N GPUs, more is N / 8 hosts of 8. Programs lowered for a mesh
over these devices compile with the real GPU compiler (sm_90), so their memory analysis and any
compile error are those of the H200. Nothing can run on them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from importlib import resources

import jax
import psutil

GPUS_PER_HOST = 8
DEFAULT_GPU_MEM_FRACTION = 0.75  # XLA's own default for XLA_PYTHON_CLIENT_MEM_FRACTION
_TARGET_CONFIGS = {"h200": "h200.txtpb"}
_INSTALL_HINT = 'pip install -e ".[cuda12]"'


class TargetError(ValueError):
  """A --target that cannot be compiled for here; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to build a mesh on and what their memory holds."""
  name: str                  # "local" or the --target spec ("h200:8")
  devices: tuple[jax.Device, ...]
  device_memory_bytes: int   # physical memory of one device (host RAM for CPU devices)
  allocator_fraction: float  # share of it XLA's allocator may take (1.0 on CPU)

  @property
  def platform(self) -> str:
    return self.devices[0].platform

  @property
  def device_kind(self) -> str:
    return self.devices[0].device_kind

  @property
  def device_bytes(self) -> int:
    """Bytes one device's allocator may hand out: what a program must fit in."""
    return int(self.device_memory_bytes * self.allocator_fraction)


def gpu_allocator_fraction() -> float:
  """XLA_PYTHON_CLIENT_MEM_FRACTION as the GPU client will read it (launch.py sets 0.95)."""
  if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() in ("false", "0") and \
      "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
    return 1.0
  return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_GPU_MEM_FRACTION))


def parse(spec: str) -> tuple[str, int]:
  """'h200:8' -> ('h200', 8); a bare 'h200' is one device."""
  match = re.fullmatch(r"([a-z0-9]+)(?::(\d+))?", spec.strip().lower())
  if not match or match.group(1) not in _TARGET_CONFIGS:
    raise TargetError(f"--target={spec!r}: expected NAME[:DEVICES] with NAME one of {sorted(_TARGET_CONFIGS)}")
  count = int(match.group(2) or 1)
  if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
    raise TargetError(f"--target={spec!r}: device count must be 1..{GPUS_PER_HOST} (one host) or a multiple "
                      f"of {GPUS_PER_HOST} ({GPUS_PER_HOST} per host)")
  return match.group(1), count


def topology(count: int) -> str:
  """XLA's GPU topology string, slices x hosts x devices-per-host: 8 -> '1x1x8', 32 -> '1x4x8'."""
  if count <= GPUS_PER_HOST:
    return f"1x1x{count}"
  return f"1x{count // GPUS_PER_HOST}x{GPUS_PER_HOST}"


def target_config_text(name: str) -> str:
  """The shipped GpuTargetConfig text proto for `name`."""
  return resources.files(__package__).joinpath(_TARGET_CONFIGS[name]).read_text()


def device_memory_size(config_text: str) -> int:
  match = re.search(r"^\s*device_memory_size:\s*(\d+)", config_text, re.MULTILINE)
  if not match:
    raise TargetError("target config has no gpu_device_info.device_memory_size")
  return int(match.group(1))


def compile_target(spec: str) -> Target:
  """Devices for `--target=spec` from XLA's compile-only GPU client; needs the cuda12 extra."""
  name, count = parse(spec)
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    raise TargetError(f"--target={spec}: compiling for a GPU needs JAX's CUDA plugin: {_INSTALL_HINT}")
  from jax.experimental.topologies import get_topology_desc  # pylint: disable=g-import-not-at-top
  text = target_config_text(name)
  try:
    description = get_topology_desc(name, "cuda", target_config=text, topology=topology(count))
  except NotImplementedError as err:  # the plugin did not register: it probed for a driver and failed
    raise TargetError(f"--target={spec}: JAX's CUDA plugin is not loaded ({err}); run with JAX_PLATFORMS=cpu "
                      f"(launch.py does so for --target) and with the cuda12 extra: {_INSTALL_HINT}") from err
  return Target(name=f"{name}:{count}", devices=tuple(description.devices),
                device_memory_bytes=device_memory_size(text), allocator_fraction=gpu_allocator_fraction())


def local_target() -> Target:
  """This process's devices: the allocator's limit on accelerators, total host RAM on CPU."""
  devices = tuple(jax.devices())
  device = devices[0]
  if device.platform == "cpu":
    return Target("local", devices, int(psutil.virtual_memory().total), 1.0)
  stats = device.memory_stats() or {}
  fraction = gpu_allocator_fraction()
  if "bytes_limit" in stats:  # already the fraction of the physical memory
    return Target("local", devices, int(stats["bytes_limit"] / fraction), fraction)
  return Target("local", devices, int(psutil.virtual_memory().total), 1.0)


def resolve(spec: str) -> Target:
  """`--target` as given: empty for the local devices, else a compile-only target."""
  return compile_target(spec) if spec else local_target()
