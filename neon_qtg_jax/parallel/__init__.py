"""Multi-process start-up, the device mesh, logical-axis sharding, global inputs and collective decisions."""

from neon_qtg_jax.parallel.mesh import MESH_AXES, describe, make_mesh, mesh_shape
from neon_qtg_jax.parallel.sharding import ShardingConfig, constrain, logical_to_mesh

__all__ = ["MESH_AXES", "describe", "make_mesh", "mesh_shape", "ShardingConfig", "constrain", "logical_to_mesh"]
