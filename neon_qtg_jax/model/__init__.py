"""The QTG decoder in Flax nnx, and its attention kinds (model/attention/)."""

from neon_qtg_jax.model.qtg import Attention, Block, GeoAttention, QEmbed, QTGModel, TopoFilter

__all__ = ["Attention", "Block", "GeoAttention", "QEmbed", "QTGModel", "TopoFilter"]
