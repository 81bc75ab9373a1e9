"""Attention kinds: the registry (base.py) and the built-in kinds, one file each (dot, geo, cosine).

`get(name)` is the kind `model.attention=name` selects; `names()` lists the registered ones (config
validation reads it). A new kind is a file that subclasses `AttentionKind` and calls `register`
(docs/ARCHITECTURE.md, "Attention kinds").
"""

from neon_qtg_jax.model.attention.base import AttentionKind, get, names, register, unregister
# Importing a kind's module registers it; this order is the order names() lists them in.
from neon_qtg_jax.model.attention import geo  # noqa: F401,E402  isort:skip
from neon_qtg_jax.model.attention import dot  # noqa: F401,E402  isort:skip
from neon_qtg_jax.model.attention import cosine  # noqa: F401,E402  isort:skip

__all__ = ["AttentionKind", "get", "names", "register", "unregister"]
