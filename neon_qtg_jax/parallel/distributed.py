"""Multi-controller start-up: one process per host (or per GPU), all running the same program.

`initialize` joins the processes through `jax.distributed.initialize`, from explicit flags or from
the environment JAX understands: SLURM (srun), Open MPI (mpirun), or JAX_COORDINATOR_ADDRESS with
JAX_NUM_PROCESSES and JAX_PROCESS_ID. One process with nothing set is a no-op. It must run before
anything touches a JAX backend (launch.py calls it first).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """How this process joins the others; num_processes 1 means a single-process run."""
  coordinator_address: str = ""  # host:port of process 0
  num_processes: int = 1
  process_id: int = 0
  source: str = "single process"  # "flags", "environment" or "SLURM"/"Open MPI" auto-detection


def _int_env(name: str) -> int | None:
  value = os.environ.get(name, "")
  return int(value) if value.strip() else None


def resolve(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> ProcessGroup:
  """The process group from flags (when given) or the environment. Raises ValueError on a half-given set."""
  if coordinator_address or num_processes > 1:
    if not (coordinator_address and num_processes > 0 and 0 <= process_id < num_processes):
      raise ValueError(f"--coordinator_address={coordinator_address!r} --num_processes={num_processes} "
                       f"--process_id={process_id}: give all three, with 0 <= process_id < num_processes")
    return ProcessGroup(coordinator_address, num_processes, process_id, "flags")
  env_count = _int_env("JAX_NUM_PROCESSES")
  if os.environ.get("JAX_COORDINATOR_ADDRESS") and env_count and env_count > 1:
    env_id = _int_env("JAX_PROCESS_ID")
    if env_id is None:
      raise ValueError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but JAX_PROCESS_ID is not")
    return ProcessGroup(os.environ["JAX_COORDINATOR_ADDRESS"], env_count, env_id, "environment")
  if (_int_env("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return ProcessGroup(num_processes=_int_env("SLURM_NTASKS"), process_id=_int_env("SLURM_PROCID") or 0,
                        source="SLURM")
  if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return ProcessGroup(num_processes=_int_env("OMPI_COMM_WORLD_SIZE"),
                        process_id=_int_env("OMPI_COMM_WORLD_RANK") or 0, source="Open MPI")
  return ProcessGroup()


def initialize(group: ProcessGroup) -> None:
  """Joins the process group (no-op for one process). CPU devices talk through gloo collectives."""
  if group.num_processes <= 1 or jax.distributed.is_initialized():
    return
  # Without this, CPU computations spanning processes fail; GPU backends ignore it (they use NCCL).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if group.source in ("SLURM", "Open MPI"):
    jax.distributed.initialize()  # JAX reads the coordinator, count and rank from the cluster
  else:
    jax.distributed.initialize(coordinator_address=group.coordinator_address,
                               num_processes=group.num_processes, process_id=group.process_id)
  log.info("process %d of %d joined (%s); %d local of %d global devices", jax.process_index(),
           jax.process_count(), group.source, jax.local_device_count(), jax.device_count())
