"""neon_qtg_jax: training, evaluation and sampling for the NEON-QTG decoder family in JAX/Flax nnx.

On a machine without an NVIDIA driver (no /proc/driver/nvidia), importing the package sets JAX_PLATFORMS=cpu
unless the environment sets it: an installed CUDA plugin (the `cuda12` extra) otherwise fails its probe with a
long traceback before JAX falls back to the CPU. It applies when the package is imported before jax.
"""

import os as _os

if not _os.path.exists("/proc/driver/nvidia"):
  _os.environ.setdefault("JAX_PLATFORMS", "cpu")

__version__ = "0.1.0"
