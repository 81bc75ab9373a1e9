"""Train state and the compiled train and eval steps.

The model is split once into a static graphdef and a params nnx.State; the steps merge them
inside the traced function, so no nnx graph traversal runs per step in Python. Parameters are
float32 (the master copy); the model runs its matmuls in `model.dtype`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from neon_qtg_jax.parallel import ShardingConfig
from neon_qtg_jax.loss import LossWeights, qtg_loss
from neon_qtg_jax.model.qtg import QTGModel
from neon_qtg_jax.training.optimizer import learning_rate_schedule, make_optimizer

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LOSS_TERMS = ("loss", "ce", "topo", "geo", "quantum")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. `rng` is raw uint32 key data; step keys are fold_in(rng, step)."""
  step: jax.Array                # int32 (): steps taken, including skipped non-finite ones
  params: nnx.State              # float32 parameters
  opt_state: Any
  rng: jax.Array                 # uint32 (2,)
  nonfinite_streak: jax.Array    # int32 (): consecutive non-finite steps ending at `step`
  nonfinite_peak: jax.Array      # int32 (): longest streak so far
  nonfinite_total: jax.Array     # int32 (): all skipped steps


def model_graphdef(config: ml_collections.ConfigDict) -> nnx.GraphDef:
  """The static graph of QTGModel(config.model), built from abstract shapes (no allocation)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: QTGModel(config.model, rngs=nnx.Rngs(0))), nnx.Param)
  return graphdef


def _init_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  init_key, train_key = jax.random.split(rng)
  model = QTGModel(config.model, rngs=nnx.Rngs(params=init_key))
  params = nnx.state(model, nnx.Param)
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=make_optimizer(config.training).init(params),
                    rng=train_key, nonfinite_streak=zero, nonfinite_peak=zero, nonfinite_total=zero)


def abstract_train_state(config: ml_collections.ConfigDict) -> TrainState:
  """TrainState of ShapeDtypeStructs: shapes and dtypes without allocating anything."""
  return jax.eval_shape(lambda key: _init_state(config, key), jax.random.PRNGKey(0))


def state_shardings(config: ml_collections.ConfigDict, sharding: ShardingConfig) -> TrainState:
  """Shardings for every leaf of the train state from the parameters' logical axes and the rules.

  The optimizer moments carry the parameters' axis names, so they are split like the parameters.
  """
  abstract = abstract_train_state(config)
  replicated = sharding.replicated()
  return abstract.replace(
      step=replicated, rng=replicated, nonfinite_streak=replicated, nonfinite_peak=replicated,
      nonfinite_total=replicated, params=sharding.params(abstract.params), opt_state=sharding.params(abstract.opt_state))


def sharded_abstract_state(config: ml_collections.ConfigDict, sharding: ShardingConfig) -> TrainState:
  """TrainState of ShapeDtypeStructs carrying their shardings: a restore target, or a compile input."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_train_state(config), state_shardings(config, sharding))


def init_fn(config: ml_collections.ConfigDict, sharding: ShardingConfig) -> Callable[[jax.Array], TrainState]:
  """The jit-compiled fresh start: PRNG key -> TrainState built directly in its shards."""
  return jax.jit(lambda key: _init_state(config, key), out_shardings=state_shardings(config, sharding))


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       sharding: ShardingConfig) -> tuple[nnx.GraphDef, TrainState]:
  """Initialises parameters and optimizer state directly in their shards: (graphdef, TrainState)."""
  return model_graphdef(config), init_fn(config, sharding)(rng)


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
  t = config.training
  return t.batch_size * t.grad_accum_steps * config.data.max_length


LAYER_KINDS = {"attn": "attention", "w_o": "attention", "w_psi": "attention", "w_1": "mlp", "w_2": "mlp",
               "ln1": "norm", "ln2": "norm"}
TOP_LEVEL_GROUPS = {"embed": "embedding", "head": "embedding", "ln_f": "final_norm"}


def _group_of(path: tuple[Any, ...]) -> tuple[bool, str]:
  """(per layer, group) of a parameter path: block kinds (attention, mlp, norm) or a top-level group."""
  keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
  if keys[0] == "blocks":
    return True, LAYER_KINDS.get(keys[1], keys[1])
  return False, TOP_LEVEL_GROUPS.get(keys[0], keys[0])


def layer_groups(params: nnx.State, num_layers: int) -> tuple[str, ...]:
  """The names of group_norms' entries: block_{i:02d}/{kind} for every layer, then the top-level groups."""
  per_layer, top = set(), set()
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    layered, group = _group_of(path)
    (per_layer if layered else top).add(group)
  return tuple(f"block_{i:02d}/{kind}" for i in range(num_layers) for kind in sorted(per_layer)) + tuple(sorted(top))


def group_norms(tree: nnx.State) -> jax.Array:
  """L2 norm of a params-shaped tree per layer_groups entry, float32 (G,): one fused pass, no host sync.

  The stacked blocks' leading axis is the layer, so a block parameter adds one value per layer.
  """
  per_layer: dict[str, jax.Array] = {}
  top: dict[str, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    layered, group = _group_of(path)
    square = jnp.square(leaf.astype(jnp.float32))
    if layered:
      per_layer[group] = per_layer.get(group, 0.0) + square.sum(axis=tuple(range(1, leaf.ndim)))
    else:
      top[group] = top.get(group, 0.0) + square.sum()
  blocks = jnp.stack([per_layer[k] for k in sorted(per_layer)], axis=1).reshape(-1)  # layer-major
  return jnp.sqrt(jnp.concatenate([blocks, jnp.stack([top[k] for k in sorted(top)])]))


def layer_stats(grads: nnx.State, updates: nnx.State, params: nnx.State) -> dict[str, jax.Array]:
  """grad_norm and update_ratio (|update| / |param| before the update) per layer_groups entry."""
  return {"grad_norm": group_norms(grads),
          "update_ratio": group_norms(updates) / jnp.maximum(group_norms(params), 1e-8)}


def _tree_select(keep_new: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)


def loss_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, weights: LossWeights,
            dropout_key: jax.Array | None) -> tuple[jax.Array, Metrics]:
  """Total loss and every term for one microbatch: inputs, targets (B, L) int32, optional mask (B, L)."""
  model = nnx.merge(graphdef, params)
  logits, aux = model(batch["inputs"], dropout_key=dropout_key, return_aux=True)
  terms = qtg_loss(logits, batch["targets"], aux, weights, batch.get("mask"))
  return terms["loss"], terms


def accumulated_grads(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, weights: LossWeights,
                      num_micro: int, dropout_key: jax.Array | None,
                      micro_sharding: jax.sharding.Sharding | None = None) -> tuple[nnx.State, Metrics]:
  """Mean gradient and loss terms over `num_micro` microbatches of the (num_micro * b, L) batch.

  The microbatches run one after another in a lax.scan, summing float32 gradients, so peak
  activation memory is that of one microbatch.
  """
  grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

  def micro_key(i):
    return None if dropout_key is None else jax.random.fold_in(dropout_key, i)

  if num_micro == 1:
    (_, terms), grads = grad_fn(graphdef, params, batch, weights, micro_key(0))
    return grads, {k: terms[k] for k in LOSS_TERMS}

  def split(x):
    x = x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])
    if micro_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, micro_sharding)
    return x
  micro = {k: split(v) for k, v in batch.items()}

  def body(carry, xs):
    grad_sum, term_sum = carry
    micro_batch, i = xs
    (_, terms), grads = grad_fn(graphdef, params, micro_batch, weights, micro_key(i))
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    term_sum = {k: term_sum[k] + terms[k] for k in LOSS_TERMS}
    return (grad_sum, term_sum), None

  zeros = (jax.tree.map(jnp.zeros_like, params), {k: jnp.zeros((), jnp.float32) for k in LOSS_TERMS})
  (grad_sum, term_sum), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(num_micro)))
  scale = 1.0 / num_micro
  return jax.tree.map(lambda g: g * scale, grad_sum), {k: v * scale for k, v in term_sum.items()}


def train_step_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                  micro_sharding: jax.sharding.Sharding | None = None
                  ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The uncompiled step: (state, batch) -> (state, metrics); batch arrays are (accum * batch_size, L).

  metrics: the loss terms, perplexity, grad_norm, param_norm, lr, finite (scalars) and layers
  ({"grad_norm", "update_ratio"}: (G,) per layer_groups entry).
  """
  t = config.training
  optimizer = make_optimizer(t)
  schedule = learning_rate_schedule(t)
  weights = LossWeights.from_config(t)
  use_dropout = config.model.dropout > 0

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    step_key = jax.random.fold_in(state.rng, state.step) if use_dropout else None
    grads, terms = accumulated_grads(graphdef, state.params, batch, weights, t.grad_accum_steps, step_key,
                                     micro_sharding)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A non-finite step keeps the old parameters and optimizer state (the optax count included).
    # optax.apply_if_finite is not used: it applies updates again after a streak, and we stop instead.
    params = _tree_select(finite, new_params, state.params)
    opt_state = _tree_select(finite, new_opt_state, state.opt_state)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    applied = state.step - state.nonfinite_total  # updates applied before this step
    metrics = dict(terms, perplexity=jnp.exp(terms["ce"]), grad_norm=grad_norm,
                   param_norm=optax.global_norm(params), lr=schedule(applied), finite=finite,
                   layers=layer_stats(grads, updates, state.params))
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, nonfinite_streak=streak,
        nonfinite_peak=jnp.maximum(state.nonfinite_peak, streak),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    return new_state, metrics

  return step


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    sharding: ShardingConfig) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """jit-compiled train step with the state donated; works on abstract inputs for .lower().

  Batch rows are split over the "batch" rule's mesh axes (parallel.inputs.check_batch rejects a
  batch that does not divide); activations are constrained by logical names while the step traces.
  """
  shardings = state_shardings(config, sharding)
  step = train_step_fn(config, graphdef, sharding.batch(leading=1))

  def sharded_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    with sharding.activations():
      return step(state, batch)

  return jax.jit(sharded_step, donate_argnums=(0,), in_shardings=(shardings, sharding.batch()),
                 out_shardings=(shardings, sharding.replicated()))


def make_eval_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                   sharding: ShardingConfig) -> Callable[[nnx.State, Batch], Metrics]:
  """jit-compiled evaluation of one batch without dropout: every loss term.

  Activations follow the rules and the scalars come back replicated (readable on every process).
  """
  weights = LossWeights.from_config(config.training)

  def evaluate(params: nnx.State, batch: Batch) -> Metrics:
    with sharding.activations():
      _, terms = loss_fn(graphdef, params, batch, weights, None)
    return {k: terms[k] for k in LOSS_TERMS}
  return jax.jit(evaluate, out_shardings=sharding.replicated())
