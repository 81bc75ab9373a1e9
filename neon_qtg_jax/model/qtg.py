"""The QTG decoder (docs/MODEL.md states the definition) in Flax nnx, with the switches that make it a plain GPT.

One forward pass serves training, evaluation, cached decoding and attention maps: `QTGModel.__call__`
takes an optional decode cache (model/cache.py) and returns it updated, and `record=True` sows the
attention probabilities and the TopoFilter's s_t and w_t (nnx.Intermediate) for analysis. The score
itself comes from the attention kind `model.attention` names (model/attention/).

Complex vectors of width d are real arrays of width 2d laid out [re | im]. Parameters are
float32; matmuls run in `model.dtype` (bf16 on GPUs); the residual stream, norms' statistics,
the TopoFilter distances, the Bhattacharyya coefficients and the logits are float32.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from neon_qtg_jax import ops
from neon_qtg_jax.model import attention as attention_kinds
from neon_qtg_jax.model import initializers
from neon_qtg_jax.model.cache import LayerCache, Slots, write
from neon_qtg_jax.model.common import (POSITIVE_MAPS, axes, inverse_softplus, positive_scale,  # noqa: F401
                                       positive_scale_raw, rms_normalize)
from neon_qtg_jax.ops.dispatch import resolve_impl
from neon_qtg_jax.ops.geo_attention import causal_mask, masked_softmax
from neon_qtg_jax.ops.topo_filter import k_smallest_mean
from neon_qtg_jax.parallel.sharding import constrain

Aux = dict[str, jax.Array]
Axes = tuple[str | None, ...]
# The residual stream at block boundaries: rows split over the batch axes, full width on every
# tensor shard (the TopoFilter distances and the amplitude norm need all 2d components).
RESIDUAL_AXES: Axes = ("batch", "length", "act_embed")

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "block": None,  # save only the block inputs; recompute everything inside
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def compute_dtype(cfg: ml_collections.ConfigDict) -> jnp.dtype:
  return jnp.dtype(cfg.dtype)


def attention_dim(cfg: ml_collections.ConfigDict) -> int:
  """Width of Q, K and V: the spec's d, or the residual width 2d (`model.attention_width`, a standard GPT)."""
  return 2 * cfg.embed_dim if cfg.attention_width == "residual" else cfg.embed_dim


def head_dim(cfg: ml_collections.ConfigDict) -> int:
  return attention_dim(cfg) // cfg.num_heads


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when key is None or rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def amplitude_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / max(||x||_2, eps) over the last axis: the amplitude encoding |psi>."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _norm(cfg: ml_collections.ConfigDict, width: int, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.norm == "rmsnorm":
    return nnx.RMSNorm(width, epsilon=cfg.norm_eps, dtype=jnp.float32, scale_metadata=axes("norm"), rngs=rngs)
  return nnx.LayerNorm(width, epsilon=cfg.norm_eps, dtype=jnp.float32, scale_metadata=axes("norm"),
                       bias_metadata=axes("norm"), rngs=rngs)


def _state_preparation(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Linear:
  """W_psi (2d -> 2d): normal(init_std) as the spec's other matrices, or a random orthogonal matrix
  (`model.w_psi_init="orthogonal"`), which keeps ||psi|| = ||LN_1(h)||, the real form of a unitary
  state preparation."""
  width = 2 * cfg.embed_dim
  init = (initializers.sequential_orthogonal() if cfg.w_psi_init == "orthogonal"
          else nnx.initializers.normal(cfg.init_std))
  return nnx.Linear(width, width, use_bias=cfg.use_bias, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
                    kernel_init=init, kernel_metadata=axes("embed", None), bias_metadata=axes(None), rngs=rngs)


def _qkv_init(std: float, qk_std: float) -> Callable[..., jax.Array]:
  """Normal init of the fused QKV kernel with std `qk_std` for the Q and K thirds, `std` for V.

  nnx.LinearGeneral initialises it flattened to (2d, 3 * H * hd), Q first, then K and V.
  """
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    third = shape[-1] // 3
    scale = jnp.repeat(jnp.asarray([qk_std, qk_std, std], dtype), third)
    return jax.random.normal(key, shape, dtype) * scale
  return init


def _linear(cfg: ml_collections.ConfigDict, fan_in: int, fan_out: int, std: float, rngs: nnx.Rngs,
            names: Axes, out_dtype: jnp.dtype | None = None) -> nnx.Linear:
  """fan_in -> fan_out; `names` are the kernel's two logical axes (the bias takes the second)."""
  return nnx.Linear(fan_in, fan_out, use_bias=cfg.use_bias, dtype=compute_dtype(cfg),
                    param_dtype=jnp.float32, kernel_init=nnx.initializers.normal(std),
                    preferred_element_type=out_dtype, kernel_metadata=axes(*names),
                    bias_metadata=axes(names[-1]), rngs=rngs)


class QEmbed(nnx.Module):
  """x_t = normalize(E[tok_t] + P[t]): (B, L) int32 -> (B, L, 2d) float32 of unit norm.

  With `amplitude_embedding=False` x_t = E[tok_t] + P[t], the GPT embedding.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    width = 2 * cfg.embed_dim
    self.eps = cfg.eps
    self.normalize = cfg.amplitude_embedding
    self.tokens = nnx.Embed(cfg.vocab_size, width, param_dtype=jnp.float32,
                            embedding_init=nnx.initializers.normal(cfg.init_std),
                            embedding_metadata=axes("vocab", "embed"), rngs=rngs)
    self.positions = nnx.Param(nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.max_seq_len, width)),
                               **axes(None, "embed"))

  def __call__(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    x = (self.tokens(tokens) + self.positions[...][positions]).astype(jnp.float32)
    return amplitude_normalize(x, self.eps) if self.normalize else x


class TopoFilter(nnx.Module):
  """f_t = w_t psi_t with w_t = exp(-max(s_t - threshold, 0) / tau); s_t the causal persistence."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.threshold = cfg.persistence_threshold
    self.tau = cfg.tau
    self.k = cfg.topo_k
    self.eps = cfg.eps
    self.stop_grad = cfg.topo_stop_grad
    self.impl = cfg.attention_impl
    self.blockwise_min_len = cfg.blockwise_min_len
    self.block_q, self.block_k = cfg.block_q, cfg.block_k

  def persistence(self, psi: jax.Array) -> jax.Array:
    """psi (B, L, 2d) -> s (B, L) float32."""
    impl = resolve_impl(self.impl, psi.shape[1], self.blockwise_min_len)
    s = ops.topo_persistence(psi, k=self.k, eps=self.eps, impl=impl, block_q=self.block_q, block_k=self.block_k)
    return jax.lax.stop_gradient(s) if self.stop_grad else s

  def weights(self, s: jax.Array) -> jax.Array:
    return ops.persistence_weights(s, self.threshold, self.tau)

  def cached_persistence(self, psi: jax.Array, phi: jax.Array, slots: Slots) -> tuple[jax.Array, jax.Array]:
    """s_t of new states psi (B, n, 2d) against the cached unit states phi (B, T, 2d), after writing
    theirs at the new slots: (s (B, n) float32, phi updated)."""
    phi_new = ops.unit_states(psi, self.eps)
    phi = write(phi, phi_new, slots.start)
    gram = jnp.einsum("bqc,bkc->bqk", phi_new, phi)
    return k_smallest_mean(jnp.maximum(2.0 - 2.0 * gram, 0.0), slots.strictly_before(), self.k), phi

  def __call__(self, psi: jax.Array, phi: jax.Array | None = None,
               slots: Slots | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """psi (B, L, 2d) -> (f (B, L, 2d) in psi's dtype, s (B, L) float32, phi).

    With a decode cache's unit states phi (B, T, 2d) and the new tokens' slots, s_t reads the cached
    states of earlier tokens and phi comes back with the new ones written; without, phi is None.
    """
    if phi is None:
      s = self.persistence(psi)
    else:
      s, phi = self.cached_persistence(psi, phi, slots)
    return (self.weights(s)[..., None] * psi).astype(psi.dtype), s, phi


class Attention(nnx.Module):
  """Q, K, V = W f (2d -> attention_dim each, fused), H heads, scored by the attention kind
  `model.attention` names (model/attention/: geo, dot, cosine, or one registered elsewhere).

  (B, L, 2d) -> (B, L, attention_dim). The kind creates its own parameters on this module (geo and
  cosine: gamma_raw, and beta_raw for the scaled and normed sphere maps).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.kind_name = cfg.attention
    kind = attention_kinds.get(cfg.attention)
    self.num_heads = cfg.num_heads
    self.head_dim = head_dim(cfg)
    self.eps = cfg.eps
    self.impl = cfg.attention_impl
    self.blockwise_min_len = cfg.blockwise_min_len
    self.block_q, self.block_k = cfg.block_q, cfg.block_k
    # Head-shaped (2d, 3, H, hd): split over "tensor" by heads, each shard holds whole q, k, v heads.
    self.w_qkv = nnx.LinearGeneral(2 * cfg.embed_dim, (3, cfg.num_heads, self.head_dim), use_bias=cfg.use_bias,
                                   dtype=compute_dtype(cfg), param_dtype=jnp.float32,
                                   kernel_init=_qkv_init(cfg.init_std, cfg.qk_init_std or cfg.init_std),
                                   kernel_metadata=axes("embed", None, "heads", "head_dim"),
                                   bias_metadata=axes(None, "heads", "head_dim"), rngs=rngs)
    kind.init_params(self, cfg)

  @property
  def kind(self) -> attention_kinds.AttentionKind:
    return attention_kinds.get(self.kind_name)

  def learned_scales(self) -> dict[str, jax.Array]:
    """The kind's learned per-head scales by name ("gamma", "beta"), each (H,) float32 (leading layer axes kept)."""
    return self.kind.learned_scales(self)

  def gamma(self) -> jax.Array | None:
    """The per-head scale gamma (H,) float32 of kinds that have one (geo, cosine), else None."""
    return self.learned_scales().get("gamma")

  def beta(self) -> jax.Array | None:
    """The per-head scale beta (H,) of the scaled and normed sphere maps, else None."""
    return self.learned_scales().get("beta")

  def project(self, f: jax.Array, w: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """f (B, L, 2d) -> q, k, v each (B, L, H, hd); q and k as the kind's score receives them
    (AttentionKind.inputs, then AttentionKind.filter_weight with the TopoFilter's weights w (B, L) when
    given: `model.topo_apply="after_norm"`)."""
    qkv = constrain(self.w_qkv(f), ("batch", "length", None, "act_heads", None))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = self.kind.inputs(self, q, k)
    if w is not None:
      q, k = self.kind.filter_weight(self, q, k, w)
    return q, k, v

  def __call__(self, f: jax.Array, cache: tuple[jax.Array, jax.Array] | None = None, slots: Slots | None = None,
               record: bool = False, w: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """f (B, n, 2d) -> (out (B, n, attention_dim), cache).

    w: the TopoFilter's weights (B, n) of these tokens, given under `model.topo_apply="after_norm"`:
    the kind applies them again where its input map divides their scale away (AttentionKind.filter_weight).

    cache: this layer's (keys, values) buffers (B, T, H, .) of a decode cache, with the new tokens' slots:
    the new keys (as the kind stores them) and values are written there and every new token attends
    to the valid slots up to its own; returned updated (None without a cache). record=True sows the
    attention probabilities (B, H, L, L) as "attention" and the kind's diagnostics (nnx.Intermediate),
    computing them explicitly (the reference path) so the output is made from the very probabilities sown.
    """
    q, k, v = self.project(f, w)
    kind = self.kind
    p = kind.score_params(self)
    if cache is not None:
      keys, values = cache
      values = write(values, v, slots.start)
      keys = write(keys, kind.key(k, v.dtype), slots.start)
      out = ops.masked_softmax_values(kind.scores(kind.query(q, v.dtype), keys, p), values, slots.visible()[:, None])
      cache = (keys, values)
    elif record:
      mask = causal_mask(q.shape[1], k.shape[1])
      probs = masked_softmax(kind.scores(kind.query(q, v.dtype), kind.key(k, v.dtype), p), mask)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
                       ).astype(v.dtype)
      self.sow(nnx.Intermediate, "attention", probs)
      for name, value in kind.diagnostics(q, k, p, mask).items():
        self.sow(nnx.Intermediate, name, value)
    else:
      impl = resolve_impl(self.impl, f.shape[1], self.blockwise_min_len)
      out = kind.attend(q, k, v, p, impl=impl, block_q=self.block_q, block_k=self.block_k)
    return out.reshape(f.shape[0], f.shape[1], -1), cache


GeoAttention = Attention  # the former name

class Block(nnx.Module):
  """Pre-norm QTG block: TopoFilter -> attention -> W_O residual, then the MLP residual.

  `model.topo_apply`: "inputs" (f = w psi feeds Q, K and V; the normed sphere map divides w's scale
  out of q and k, so the filter then only scales the values) or "after_norm" (also w times the sphere
  map's normalised input, so the filter changes what attention selects; docs/MODEL.md, "TopoFilter").

  With `w_psi=False`, `topofilter=False` and `attention="dot"` it is the standard pre-norm GPT block.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d = cfg.embed_dim
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.dropout_rate = cfg.dropout
    self.use_topofilter = cfg.topofilter
    self.topo_after_norm = cfg.topofilter and cfg.topo_apply == "after_norm"
    self.activation = jax.nn.gelu if cfg.activation == "gelu" else jax.nn.relu
    self.compute_dtype = cfg.dtype
    self.ln1 = _norm(cfg, 2 * d, rngs)
    # psi keeps its full width on every tensor shard (see RESIDUAL_AXES): only the input is FSDP-split.
    self.w_psi = _state_preparation(cfg, rngs) if cfg.w_psi else None
    self.topo = TopoFilter(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.w_o = _linear(cfg, attention_dim(cfg), 2 * d, out_std, rngs, ("heads", "embed"))
    self.ln2 = _norm(cfg, 2 * d, rngs)
    self.w_1 = _linear(cfg, 2 * d, cfg.mlp_ratio * d, cfg.init_std, rngs, ("embed", "mlp"))
    self.w_2 = _linear(cfg, cfg.mlp_ratio * d, 2 * d, out_std, rngs, ("mlp", "embed"))

  def psi(self, h: jax.Array) -> jax.Array:
    """h (B, L, 2d) -> psi = W_psi LN_1(h), or LN_1(h) without W_psi; (B, L, 2d) compute dtype."""
    x = self.ln1(h)
    return self.w_psi(x) if self.w_psi is not None else x.astype(self.compute_dtype)

  def filter(self, psi: jax.Array, phi: jax.Array | None = None,
             slots: Slots | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """psi -> (f compute dtype, s (B, L) float32, phi): the TopoFilter, or f = psi and s = 0 without it."""
    if not self.use_topofilter:
      return psi, jnp.zeros(psi.shape[:2], jnp.float32), phi
    return self.topo(psi, phi, slots)

  def filtered_states(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h (B, L, 2d) -> (f (B, L, 2d) compute dtype, s (B, L) float32; zeros without the filter)."""
    f, s, _ = self.filter(self.psi(h))
    return f, s

  def mlp_residual(self, h: jax.Array, key: jax.Array | None) -> jax.Array:
    y = self.w_2(self.activation(self.w_1(self.ln2(h))))
    return h + dropout(y.astype(jnp.float32), self.dropout_rate, key)

  def __call__(self, h: jax.Array, key: jax.Array | None = None, *, cache: LayerCache | None = None,
               slots: Slots | None = None, record: bool = False) -> tuple[jax.Array, jax.Array, LayerCache | None]:
    """h (B, L, 2d) float32 -> (h', s (B, L), cache).

    cache: this layer's part of a decode cache (keys, values, phi) with the new tokens' slots; the
    TopoFilter and the attention each read and write their own buffers and it comes back updated
    (None without a cache). record=True sows s, the filter weights w and the attention maps.
    """
    attn_key, mlp_key = jax.random.split(key) if key is not None else (None, None)
    f, s, phi = self.filter(self.psi(h), None if cache is None else cache.phi, slots)
    w = self.topo.weights(s) if self.topo_after_norm else None
    out, kv = self.attn(f, None if cache is None else (cache.keys, cache.values), slots, record, w=w)
    if record:
      self.sow(nnx.Intermediate, "s", s)
      self.sow(nnx.Intermediate, "w", self.topo.weights(s) if self.use_topofilter else jnp.ones_like(s))
    h = h + dropout(self.w_o(out).astype(jnp.float32), self.dropout_rate, attn_key)
    return self.mlp_residual(h, mlp_key), s, None if cache is None else LayerCache(*kv, phi)


def _by_name(sown: nnx.State) -> dict[str, jax.Array]:
  """{name: value} of sown nnx.Intermediate variables (each holds a tuple of one value), by their last path element."""
  return {path[-1]: variable.get_value()[0] for path, variable in nnx.to_flat_state(sown)}


class QTGModel(nnx.Module):
  """NEON-QTG decoder. `QTGModel(config.model, rngs=nnx.Rngs(seed))`.

  Calling it on int32 tokens (B, L) returns float32 logits (B, L, V); with return_aux=True it
  returns (logits, aux) with aux["s"] (num_layers, B, L) and aux["residual"] (B, L, 2d), the
  final residual stream before LN_f, from the same forward pass.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: part of the static graph
    d = cfg.embed_dim
    self.embed = QEmbed(cfg, rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(layer_rngs: nnx.Rngs) -> Block:
      return Block(cfg, rngs=layer_rngs)

    # One Block whose parameters carry a leading layer axis: the same checkpoint layout
    # whether the forward pass scans or unrolls the layers.
    self.blocks = make_blocks(rngs)
    self.ln_f = _norm(cfg, 2 * d, rngs)
    self.head = None if cfg.tie_embeddings else _linear(cfg, 2 * d, cfg.vocab_size, cfg.init_std, rngs,
                                                       ("embed", "vocab"), out_dtype=jnp.float32)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final residual stream (B, L, 2d) -> float32 logits (B, L, V): W_lm LN_f(h), or E LN_f(h) when tied."""
    x = self.ln_f(h)
    if self.head is not None:
      return self.head(x).astype(jnp.float32)
    table = self.embed.tokens.embedding[...]
    dtype = compute_dtype(self.cfg)
    return jnp.einsum("blc,vc->blv", x.astype(dtype), table.astype(dtype), preferred_element_type=jnp.float32)

  def _layer_fn(self, slots: Slots | None, record: bool) -> Callable[..., Any]:
    """(graphdef, layer state, h, dropout key, layer cache) -> (h, s, layer cache, records), records the
    layer's sown intermediates by name (empty unless record)."""
    def apply_layer(graphdef, layer_state, h, key, layer_cache):
      block = nnx.merge(graphdef, layer_state)
      h, s, layer_cache = block(h, key, cache=layer_cache, slots=slots, record=record)
      records = {}
      if record:
        records = _by_name(nnx.pop(block, nnx.Intermediate))
      return constrain(h, RESIDUAL_AXES), s, layer_cache, records

    if self.cfg.remat == "none" or slots is not None or record:  # nothing to recompute without a backward pass
      return apply_layer
    return jax.checkpoint(apply_layer, policy=REMAT_POLICIES[self.cfg.remat], static_argnums=(0,))

  def run_blocks(self, h: jax.Array, dropout_key: jax.Array | None, cache: LayerCache | None = None,
                 slots: Slots | None = None, record: bool = False
                 ) -> tuple[jax.Array, jax.Array, LayerCache | None, dict[str, jax.Array]]:
    """Applies every block: h (B, L, 2d) -> (h, s (num_layers, B, L), cache, records).

    cache: the decode cache's buffers with a leading layer axis (then the layers are scanned, each
    reading and writing its slice); records: what the layers sowed, stacked over layers."""
    graphdef, state = nnx.split(self.blocks)
    layer_fn = self._layer_fn(slots, record)
    n = self.cfg.num_layers
    keys = jax.random.split(dropout_key, n) if dropout_key is not None else None
    if self.cfg.scan_layers or cache is not None:
      def body(carry, xs):
        layer_state, key, layer_cache = xs
        h, s, layer_cache, records = layer_fn(graphdef, layer_state, carry, key, layer_cache)
        return h, (s, layer_cache, records)
      h, (s, cache, records) = jax.lax.scan(body, h, (state, keys, cache))
      return h, s, cache, records
    all_s, all_records = [], []
    for i in range(n):
      layer_state = jax.tree.map(lambda x: x[i], state)
      h, s, _, records = layer_fn(graphdef, layer_state, h, None if keys is None else keys[i], None)
      all_s.append(s)
      all_records.append(records)
    return h, jnp.stack(all_s), None, jax.tree.map(lambda *x: jnp.stack(x), *all_records)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               dropout_key: jax.Array | None = None, return_aux: bool = False, cache: LayerCache | None = None,
               slots: Slots | None = None, last_only: bool = False, record: bool = False):
    """The forward pass, for training, evaluation, decoding and analysis alike.

    tokens, positions: (B, n) int32 (positions default to 0..n-1). Returns float32 logits (B, n, V)
    (the last token's (B, 1, V) with last_only); with return_aux, (logits, aux) as the class says.
    With a decode cache (buffers with a leading layer axis, model/cache.py) and the slots of the new
    tokens, the tokens attend to the cached ones and it returns (logits, updated cache).
    record=True sows, stacked over layers, "attention" (layers, B, H, L, L), "s" and "w" (layers, B, L)
    and the attention kind's diagnostics as nnx.Intermediate on this model (see `recorded`).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    embed_key = block_key = None
    if dropout_key is not None:
      embed_key, block_key = jax.random.split(dropout_key)
    h = constrain(dropout(self.embed(tokens, positions), self.cfg.dropout, embed_key), RESIDUAL_AXES)
    h, s, cache, records = self.run_blocks(h, block_key, cache, slots, record)
    for name, value in records.items():
      self.sow(nnx.Intermediate, name, value)
    if last_only:
      h = h[:, -1:]
    logits = self.logits(h)
    if slots is not None:
      return logits, cache
    if return_aux:
      return logits, {"s": s, "residual": h}
    return logits

  def recorded(self, tokens: jax.Array) -> dict[str, jax.Array]:
    """What one recording forward pass on int32 tokens (B, L) sows (see __call__'s record), by name."""
    self(tokens, record=True)
    return _by_name(nnx.pop(self, nnx.Intermediate))

  def learned_scales(self) -> dict[str, jax.Array]:
    """The attention kind's learned per-head scales by name, each (num_layers, H) float32."""
    return self.blocks.attn.learned_scales()
