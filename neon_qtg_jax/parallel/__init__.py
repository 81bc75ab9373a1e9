"""Multi-process start-up, the device mesh, logical-axis sharding, global inputs and collective decisions."""

from neon_qtg_jax.parallel.mesh import MESH_AXES, describe, make_mesh, mesh_shape
from neon_qtg_jax.parallel.sharding import (activation_sharding, batch_sharding, batch_split, constrain,
                                            logical_to_mesh, param_shardings, replicated)

__all__ = ["MESH_AXES", "describe", "make_mesh", "mesh_shape", "activation_sharding", "batch_sharding",
           "batch_split", "constrain", "logical_to_mesh", "param_shardings", "replicated"]
