"""The ("data", "fsdp", "tensor") device mesh, shaped by the config's `parallel` section.

data: replicas that split the batch; fsdp: split the batch and shard parameters and optimizer
state (gathered per layer); tensor: split attention heads and the FFN hidden axis inside a layer.
parallel.{data,fsdp,tensor} are the sizes inside one node (fast links, -1 on one axis: whatever
the device count leaves); parallel.dcn_{data,fsdp} multiply them across nodes (slower links).
"""

from __future__ import annotations

import math

import jax
import ml_collections
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from neon_qtg_jax.config import MESH_AXIS_NAMES, ConfigError

MESH_AXES = MESH_AXIS_NAMES  # the axis tuple is written once, in config.py (the rules table beside it)
DCN_FIELDS = {"data": "dcn_data", "fsdp": "dcn_fsdp", "tensor": None}


def mesh_shape(parallel_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[dict[str, int], dict[str, int]]:
  """({axis: in-node size}, {axis: across-node size}) with -1 resolved; ConfigError naming the field."""
  dcn = {axis: (parallel_cfg[field] if field else 1) for axis, field in DCN_FIELDS.items()}
  num_nodes = math.prod(dcn.values())
  if num_devices % num_nodes:
    raise ConfigError(f"config field 'parallel.dcn_data' x 'parallel.dcn_fsdp' = {num_nodes}: must divide "
                      f"the {num_devices} devices")
  per_node = num_devices // num_nodes
  ici = {axis: parallel_cfg[axis] for axis in MESH_AXES}
  unknown = [axis for axis, size in ici.items() if size == -1]
  known = math.prod(size for size in ici.values() if size != -1)
  if len(unknown) > 1:
    raise ConfigError(f"config fields {['parallel.' + a for a in unknown]}: at most one may be -1")
  if unknown:
    if per_node % known:
      raise ConfigError(f"config field 'parallel.{unknown[0]}' = -1: the other axes ({known}) do not divide "
                        f"the {per_node} devices per node")
    ici[unknown[0]] = per_node // known
  if math.prod(ici.values()) != per_node:
    raise ConfigError(f"config fields 'parallel.data' x 'parallel.fsdp' x 'parallel.tensor' = "
                      f"{ici['data']} x {ici['fsdp']} x {ici['tensor']}: must equal the {per_node} devices "
                      f"per node ({num_devices} devices over {num_nodes} node(s))")
  return ici, dcn


def make_mesh(parallel_cfg: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Mesh:
  """The mesh of config.parallel over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = mesh_shape(parallel_cfg, len(devices))
  num_nodes = math.prod(dcn.values())
  if num_nodes > 1 and len({d.process_index for d in devices}) == num_nodes:  # one process per node
    array = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES],
                                                 devices, process_is_granule=True)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  # One node, or a stand-in for several (forced host devices in one process, the memory table):
  # the same axis sizes without the node-major device order.
  return jax.make_mesh([ici[a] * dcn[a] for a in MESH_AXES], MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def describe(mesh: Mesh) -> str:
  """'data=1 x fsdp=2 x tensor=2 over 4 devices in 2 process(es)'."""
  processes = len({d.process_index for d in mesh.devices.flat})
  sizes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
  return f"{sizes} over {mesh.size} devices in {processes} process(es)"
