"""Numerical kernels: each fast version sits beside a plain reference it is tested against."""

from neon_qtg_jax.ops.arccos_sq import arccos_sq, stable_arccos
from neon_qtg_jax.ops.dispatch import topo_persistence
from neon_qtg_jax.ops.geo_attention import (causal_mask, dot_attention_reference, geo_attention_reference,
                                            geo_scores, masked_softmax, masked_softmax_values, sqrt_probs)
from neon_qtg_jax.ops.topo_filter import persistence_weights, topo_persistence_reference, unit_states
