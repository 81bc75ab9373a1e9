"""Decisions every process must take together, the one process that writes, and who this process is.

A save, a stop or a checkpoint fallback that one process takes alone leaves the others waiting in
a collective for ever. Each process proposes from its own clock, signals and errors, and every
process acts on the OR of the proposals:

- `agree` all-gathers the proposals now (a host-blocking collective): for rare moments such as a
  resume, a save or the end of a run;
- `StepAgreement` is the per-step form: with one process it is `agree` (no communication); with
  several, the proposals of step k go into a tiny device all-reduce dispatched behind step k's
  train step, and its result is read at step k + 1, when step k + 1 is already queued on the
  devices. So every process acts at step k + 1 on what any process saw at step k, and the host
  never waits for the devices to drain.

This module is the only place that asks JAX which process this is (`is_writer`, `process_tag`,
`process_position`).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable, Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

T = TypeVar("T")


def is_writer() -> bool:
  """Process 0 writes logs, metrics, TensorBoard, plots, samples and the backup; checkpoints go through Orbax."""
  return jax.process_index() == 0


def process_tag() -> str:
  """"" for a single-process run, else "process_{i}" (per-process files and log prefixes)."""
  return "" if jax.process_count() == 1 else f"process_{jax.process_index()}"


def process_position() -> tuple[int, int]:
  """(this process's index, the number of processes): per-process files such as the data position."""
  return jax.process_index(), jax.process_count()


def agree(proposals: Mapping[str, bool]) -> dict[str, bool]:
  """{name: True on every process if any process proposed it}; no communication with one process."""
  names = sorted(proposals)
  if jax.process_count() == 1:
    return {name: bool(proposals[name]) for name in names}
  local = np.array([bool(proposals[name]) for name in names], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(local))  # (processes, len(names))
  return {name: bool(gathered[:, i].any()) for i, name in enumerate(names)}


def all_succeeded(ok: bool) -> bool:
  """True on every process only if `ok` held on every process."""
  return not agree({"failed": not ok})["failed"]


def barrier(name: str) -> None:
  """Returns once every process reached the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def on_one_process(fn: Callable[[], T], name: str) -> T | None:
  """Runs `fn` on process 0 only (e.g. a rename in a shared directory), then waits for every process.

  Returns fn's result on process 0 and None elsewhere; after it returns, every process sees the effect.
  """
  result = fn() if jax.process_index() == 0 else None
  barrier(name)
  return result


class SaveBarrier:
  """The barrier of Orbax's background saves (ocp.AsyncOptions.barrier_sync_fn) that stays in step after a failure.

  A process whose writes fail skips Orbax's "async_write_complete" barrier and goes on to the
  barriers that end the save; the others wait at "async_write_complete" until the save's timeout.
  With Orbax's default barrier (the coordination service's, which numbers repeated uses of a
  name) the failed process may give up on the end-of-save barrier just before the others arrive,
  and every later save then meets misnumbered barriers and fails too. Here the write barrier keeps
  the given timeout and every other barrier waits twice as long, so the others always arrive in
  time, and the n-th use of a name is the same barrier on every process (each passes Orbax's
  barriers in the same order). State lives in JAX's distributed key-value store.
  """
  PREFIX = "neon_qtg_jax/save_barriers"
  POLL_SECONDS = 0.1
  SKIPPED_ON_FAILURE = "async_write_complete"  # the barrier a process whose writes failed never reaches

  def __init__(self):
    from orbax.checkpoint import multihost  # pylint: disable=import-outside-toplevel
    self.client = multihost.get_jax_distributed_client()
    self._uses: collections.Counter[str] = collections.Counter()
    self._lock = threading.Lock()  # Orbax calls barriers from several background threads

  def __call__(self, *, key: str, timeout_ms: int) -> None:
    with self._lock:
      self._uses[key] += 1
      barrier = f"{self.PREFIX}/{key}/{self._uses[key]}"
    self.client.key_value_set(f"{barrier}/{jax.process_index()}", "arrived")
    timeout_s = timeout_ms / 1000 * (1 if self.SKIPPED_ON_FAILURE in key else 2)
    deadline = time.monotonic() + timeout_s
    while len(self.client.key_value_dir_get(f"{barrier}/")) < jax.process_count():
      if time.monotonic() > deadline:
        raise TimeoutError(f"barrier {key}: not every process arrived within {timeout_s:.0f} s")
      time.sleep(self.POLL_SECONDS)


@dataclasses.dataclass(frozen=True)
class Agreed:
  """What every process decided for one step: each proposal name -> whether any process proposed it."""
  step: int                     # the step whose proposals these are
  flags: Mapping[str, bool]

  def __getitem__(self, name: str) -> bool:
    return self.flags.get(name, False)


class StepAgreement:
  """Per-step agreement on boolean proposals whose names are fixed at construction.

  `step(k, proposals)` returns the Agreed record to act on at step k: step k's own proposals with
  one process, step k - 1's with several (nothing agreed at the first step).
  """

  def __init__(self, names: tuple[str, ...]):
    self.names = tuple(sorted(names))
    self._pending: tuple[int, jax.Array] | None = None
    if jax.process_count() > 1:
      devices = np.asarray(jax.devices())
      self._mesh = Mesh(devices, ("processes",))
      self._rows = NamedSharding(self._mesh, PartitionSpec("processes"))
      self._reduce = jax.jit(lambda x: jnp.max(x, axis=0), out_shardings=NamedSharding(self._mesh, PartitionSpec()))

  def _dispatch(self, local: np.ndarray) -> jax.Array:
    """One row per device, every local device holding this process's proposals; the all-reduce runs async."""
    rows = [jax.device_put(local[None], d) for d in self._mesh.local_devices]
    array = jax.make_array_from_single_device_arrays((self._mesh.size, len(self.names)), self._rows, rows)
    return self._reduce(array)

  def step(self, step: int, proposals: Mapping[str, bool]) -> Agreed:
    unknown = set(proposals) - set(self.names)
    if unknown:
      raise ValueError(f"proposals {sorted(unknown)} were not declared (have {self.names})")
    if jax.process_count() == 1:
      return Agreed(step, {name: bool(proposals.get(name, False)) for name in self.names})
    previous, self._pending = self._pending, (step, self._dispatch(
        np.array([bool(proposals.get(name, False)) for name in self.names], np.int32)))
    if previous is None:
      return Agreed(step - 1, {name: False for name in self.names})
    values = np.asarray(previous[1].addressable_data(0))
    return Agreed(previous[0], {name: bool(values[i]) for i, name in enumerate(self.names)})
