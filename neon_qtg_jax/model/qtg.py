"""The QTG decoder (../shared/QTG_SPEC.md) in Flax nnx, with the switches that make it a plain GPT.

Complex vectors of width d are real arrays of width 2d laid out [re | im]. Parameters are
float32; matmuls run in `model.dtype` (bf16 on GPUs); the residual stream, norms' statistics,
the TopoFilter distances, the Bhattacharyya coefficients and the logits are float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from neon_qtg_jax import ops
from neon_qtg_jax.model import initializers
from neon_qtg_jax.ops.dispatch import resolve_impl
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


def inverse_softplus(y: float) -> float:
  return y + math.log(-math.expm1(-y))


POSITIVE_MAPS: dict[str, tuple[Callable[[jax.Array], jax.Array], Callable[[float], float]]] = {
    "softplus": (jax.nn.softplus, inverse_softplus),
    "exp": (jnp.exp, math.log),
}


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


def axes(*names: str | None) -> dict[str, Any]:
  """nnx Variable metadata naming a parameter's logical axes (mapped to the mesh by parallel.rules).

  eager_sharding=False: the names only describe; the train step places the arrays on its mesh.
  """
  return {"out_sharding": names, "eager_sharding": False}


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

  def __call__(self, psi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """psi (B, L, 2d) -> (f (B, L, 2d) in psi's dtype, s (B, L) float32)."""
    s = self.persistence(psi)
    return (self.weights(s)[..., None] * psi).astype(psi.dtype), s


def positive_scale(raw: jax.Array, param: str, lr_mult: float) -> jax.Array:
  """A learned positive scale stored as raw: map(lr_mult * raw), map softplus or exp (`model.scale_param`).

  lr_mult (`model.scale_lr_mult`) multiplies the step AdamW takes on the scale's pre-image, so it acts
  as a learning-rate multiplier; with exp the step is taken on log(scale).
  """
  return POSITIVE_MAPS[param][0](lr_mult * raw)


def positive_scale_raw(value: float, num_heads: int, param: str, lr_mult: float) -> nnx.Param:
  """The (H,) raw parameter whose positive_scale is `value` in every head."""
  raw = POSITIVE_MAPS[param][1](value) / lr_mult
  return nnx.Param(jnp.full((num_heads,), raw, jnp.float32), **axes("heads"))


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class GeoAttention(nnx.Module):
  """Q, K, V = W f (2d -> attention_dim each, fused), H heads; Fisher-Rao or dot-product scores.

  (B, L, 2d) -> (B, L, attention_dim). For Fisher-Rao attention `model.sphere_map` chooses what the
  sphere map sqrt(softmax(.)) over head_dim receives (the score stays -gamma_h D_FR(q~, k~)^2):
    seed    q and k as projected (the spec's form)
    scaled  beta_h q and beta_h k, beta_h a learned positive per-head scale initialised at `model.beta`
    normed  beta_h q / rms(q) and beta_h k / rms(k) (QK-norm before the sphere map)
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.kind = cfg.attention
    self.num_heads = cfg.num_heads
    self.head_dim = head_dim(cfg)
    self.sphere_map = cfg.sphere_map if self.kind == "geo" else "seed"
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
    self.learn_gamma = cfg.learn_gamma
    self.scale_param, self.scale_lr_mult = cfg.scale_param, cfg.scale_lr_mult
    if self.kind == "geo":
      self.gamma_raw = positive_scale_raw(cfg.gamma, cfg.num_heads, cfg.scale_param, cfg.scale_lr_mult)
      if self.sphere_map != "seed":
        self.beta_raw = positive_scale_raw(cfg.beta, cfg.num_heads, cfg.scale_param, cfg.scale_lr_mult)

  def gamma(self) -> jax.Array | None:
    """Per-head positive scale (H,) float32, or None for dot-product attention."""
    if self.kind != "geo":
      return None
    raw = self.gamma_raw[...]
    raw = raw if self.learn_gamma else jax.lax.stop_gradient(raw)
    return positive_scale(raw, self.scale_param, self.scale_lr_mult)

  def beta(self) -> jax.Array:
    """Per-head positive scale (H,) of the sphere map's inputs (sphere_map scaled or normed)."""
    return positive_scale(self.beta_raw[...], self.scale_param, self.scale_lr_mult)

  def learned_scales(self) -> dict[str, jax.Array]:
    """The learned per-head scales by name ("gamma", "beta"), each (H,) float32 (leading layer axes kept)."""
    scales = {}
    if self.kind == "geo":
      scales["gamma"] = self.gamma()
      if self.sphere_map != "seed":
        scales["beta"] = self.beta()
    return scales

  def sphere_inputs(self, x: jax.Array) -> jax.Array:
    """What the sphere map receives for projected q or k (B, L, H, hd), per `model.sphere_map`."""
    if self.sphere_map == "seed":
      return x
    beta = self.beta()[:, None]
    if self.sphere_map == "normed":
      return (beta * rms_normalize(x, self.eps)).astype(x.dtype)
    return (beta * x.astype(jnp.float32)).astype(x.dtype)

  def project(self, f: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """f (B, L, 2d) -> q, k, v each (B, L, H, hd); for Fisher-Rao attention q and k are ready for the sphere map."""
    qkv = constrain(self.w_qkv(f), ("batch", "length", None, "act_heads", None))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return self.sphere_inputs(q), self.sphere_inputs(k), v

  def __call__(self, f: jax.Array) -> jax.Array:
    q, k, v = self.project(f)
    impl = resolve_impl(self.impl, f.shape[1], self.blockwise_min_len)
    out = ops.attention(q, k, v, self.gamma(), kind=self.kind, impl=impl, block_q=self.block_q,
                        block_k=self.block_k)
    return out.reshape(f.shape[0], f.shape[1], -1)


class Block(nnx.Module):
  """Pre-norm QTG block: TopoFilter -> GeoAttention -> W_O residual, then the MLP residual.

  With `w_psi=False`, `topofilter=False` and `attention="dot"` it is the standard pre-norm GPT block.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d = cfg.embed_dim
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.dropout_rate = cfg.dropout
    self.use_topofilter = cfg.topofilter
    self.activation = jax.nn.gelu if cfg.activation == "gelu" else jax.nn.relu
    self.compute_dtype = cfg.dtype
    self.ln1 = _norm(cfg, 2 * d, rngs)
    # psi keeps its full width on every tensor shard (see RESIDUAL_AXES): only the input is FSDP-split.
    self.w_psi = _state_preparation(cfg, rngs) if cfg.w_psi else None
    self.topo = TopoFilter(cfg)
    self.attn = GeoAttention(cfg, rngs=rngs)
    self.w_o = _linear(cfg, attention_dim(cfg), 2 * d, out_std, rngs, ("heads", "embed"))
    self.ln2 = _norm(cfg, 2 * d, rngs)
    self.w_1 = _linear(cfg, 2 * d, cfg.mlp_ratio * d, cfg.init_std, rngs, ("embed", "mlp"))
    self.w_2 = _linear(cfg, cfg.mlp_ratio * d, 2 * d, out_std, rngs, ("mlp", "embed"))

  def psi(self, h: jax.Array) -> jax.Array:
    """h (B, L, 2d) -> psi = W_psi LN_1(h), or LN_1(h) without W_psi; (B, L, 2d) compute dtype."""
    x = self.ln1(h)
    return self.w_psi(x) if self.w_psi is not None else x.astype(self.compute_dtype)

  def filtered_states(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h (B, L, 2d) -> (f (B, L, 2d) compute dtype, s (B, L) float32; zeros without the filter)."""
    psi = self.psi(h)
    if not self.use_topofilter:
      return psi, jnp.zeros(psi.shape[:2], jnp.float32)
    return self.topo(psi)

  def mlp_residual(self, h: jax.Array, key: jax.Array | None) -> jax.Array:
    y = self.w_2(self.activation(self.w_1(self.ln2(h))))
    return h + dropout(y.astype(jnp.float32), self.dropout_rate, key)

  def __call__(self, h: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """h (B, L, 2d) float32 -> (h', s (B, L))."""
    attn_key, mlp_key = jax.random.split(key) if key is not None else (None, None)
    f, s = self.filtered_states(h)
    h = h + dropout(self.w_o(self.attn(f)).astype(jnp.float32), self.dropout_rate, attn_key)
    return self.mlp_residual(h, mlp_key), s


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

  def _layer_fn(self) -> Callable[[nnx.GraphDef, Any, jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]:
    def apply_layer(graphdef, layer_state, h, key):
      h, s = nnx.merge(graphdef, layer_state)(h, key)
      return constrain(h, RESIDUAL_AXES), s

    if self.cfg.remat == "none":
      return apply_layer
    return jax.checkpoint(apply_layer, policy=REMAT_POLICIES[self.cfg.remat], static_argnums=(0,))

  def run_blocks(self, h: jax.Array, dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Applies every block: h (B, L, 2d) -> (h, s (num_layers, B, L))."""
    graphdef, state = nnx.split(self.blocks)
    layer_fn = self._layer_fn()
    n = self.cfg.num_layers
    keys = jax.random.split(dropout_key, n) if dropout_key is not None else None
    if self.cfg.scan_layers:
      def body(carry, xs):
        layer_state, key = xs
        return layer_fn(graphdef, layer_state, carry, key)
      return jax.lax.scan(body, h, (state, keys))
    all_s = []
    for i in range(n):
      layer_state = jax.tree.map(lambda x: x[i], state)
      h, s = layer_fn(graphdef, layer_state, h, None if keys is None else keys[i])
      all_s.append(s)
    return h, jnp.stack(all_s)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               dropout_key: jax.Array | None = None, return_aux: bool = False):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    embed_key = block_key = None
    if dropout_key is not None:
      embed_key, block_key = jax.random.split(dropout_key)
    h = constrain(dropout(self.embed(tokens, positions), self.cfg.dropout, embed_key), RESIDUAL_AXES)
    h, s = self.run_blocks(h, block_key)
    logits = self.logits(h)
    if return_aux:
      return logits, {"s": s, "residual": h}
    return logits
