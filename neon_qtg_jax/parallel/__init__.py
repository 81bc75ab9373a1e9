"""Device mesh and FSDP-style sharding rules."""

from neon_qtg_jax.parallel.mesh import MESH_AXES, make_mesh
from neon_qtg_jax.parallel.sharding import batch_sharding, fsdp_spec, param_shardings, replicated

__all__ = ["MESH_AXES", "make_mesh", "batch_sharding", "fsdp_spec", "param_shardings", "replicated"]
