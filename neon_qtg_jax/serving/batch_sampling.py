"""Sampling with settings per row for the server's slots: the project's one sampler, inference/sampling.py
(`sample_rows`, `filter_rows`), under the names serving/engine.py imports."""

from neon_qtg_jax.inference.sampling import filter_rows, sample_rows

__all__ = ["filter_rows", "sample_rows"]
