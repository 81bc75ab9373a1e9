"""neon_qtg_jax: training, evaluation and sampling for the NEON-QTG decoder family in JAX/Flax nnx."""

__version__ = "0.1.0"
