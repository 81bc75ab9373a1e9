"""The QTG decoder in Flax nnx."""

from neon_qtg_jax.model.qtg import Block, GeoAttention, QEmbed, QTGModel, TopoFilter

__all__ = ["Block", "GeoAttention", "QEmbed", "QTGModel", "TopoFilter"]
