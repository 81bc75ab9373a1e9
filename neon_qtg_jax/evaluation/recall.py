"""Associative recall: synthetic tasks that only input-dependent token selection solves.

Three tasks, generated in process from a seed (numpy), each row a token sequence with a mask of
the scored targets:

  mqar     multi-query associative recall in Zoology's two-token form (Arora et al., 2023): N
           (key, value) pairs "k1 v1 k2 v2 ...", then Q of the keys in random order, each followed
           by a blank token (0), so no answer is ever shown and earlier queries tell nothing about
           later ones. Scored: the prediction at each queried key (its value). Needs a
           previous-token circuit (a value's position learns its key) and a content match.
  lookup   one-token lookup: C context tokens, each one token that encodes a (key, value) pair,
           then Q keys, each followed by its value. The query must find its pair by content.
  induction  a random segment, filler, the same segment again; the filler's length varies per row,
           so the offset of the repeat does too and position alone does not solve it. Scored: every
           token of the repeat after its first.

A model is trained with the project's own train step (AdamW, warmup-cosine, clipping, the
variant's loss) on freshly generated rows and scored on held-out rows from another seed stream:
accuracy of the argmax at the scored positions, the chance level, and the attention entropy per
layer relative to uniform attention over the prefix (analysis.normalized_entropy).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from neon_qtg_jax.analysis import layer_traces, normalized_entropy
from neon_qtg_jax.config import apply_overrides, default_config, validate
from neon_qtg_jax.model.variants import VARIANTS
from neon_qtg_jax.parallel import ShardingConfig

TASKS = ("mqar", "lookup", "induction")
HELD_OUT_STREAM = 1_000_003  # held-out rows come from seed + this: a different numpy stream


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task's shape. mqar: num_pairs N, num_queries Q, vocab split in keys and values.
  lookup: num_pairs C context pair tokens over num_keys x num_values. induction: a segment of
  segment_len tokens repeated after 0..max_filler filler tokens, padded to seq_len."""
  task: str
  vocab_size: int
  num_pairs: int = 0
  num_queries: int = 0
  num_keys: int = 0
  num_values: int = 0
  segment_len: int = 0
  max_filler: int = 0

  @property
  def seq_len(self) -> int:
    """Tokens per row (inputs and targets are one shorter)."""
    if self.task == "mqar":
      return 2 * self.num_pairs + 2 * self.num_queries
    if self.task == "lookup":
      return self.num_pairs + 2 * self.num_queries
    return 2 * self.segment_len + self.max_filler + 1

  @property
  def chance(self) -> float:
    """Accuracy of guessing among what the context offers: one of the N (C) values, or a uniform token."""
    if self.task in ("mqar", "lookup"):
      return 1.0 / self.num_pairs
    return 1.0 / self.vocab_size


def mqar_rows(spec: TaskSpec, rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
  """Keys from [1, V/2), values from [V/2, V); token 0 is unused."""
  half = spec.vocab_size // 2
  keys = np.argsort(rng.random((rows, half - 1)), axis=1)[:, :spec.num_pairs] + 1
  values = rng.integers(half, spec.vocab_size, (rows, spec.num_pairs))
  context = np.stack([keys, values], axis=2).reshape(rows, -1)
  order = np.argsort(rng.random((rows, spec.num_pairs)), axis=1)[:, :spec.num_queries]
  queried = np.take_along_axis(keys, order, 1)
  blanks = np.zeros_like(queried)
  sequence = np.concatenate([context, np.stack([queried, blanks], axis=2).reshape(rows, -1)], axis=1)
  targets = np.concatenate([context, np.stack([queried, np.take_along_axis(values, order, 1)],
                                              axis=2).reshape(rows, -1)], axis=1)
  scored = np.zeros_like(sequence, bool)
  scored[:, 2 * spec.num_pairs + 1::2] = True  # the slot after each queried key: its value
  return _next_token_rows(sequence, scored, targets)


def lookup_rows(spec: TaskSpec, rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
  """Tokens: 1..K keys, then values, then the K x W pair tokens; 0 is unused."""
  key_base, value_base = 1, 1 + spec.num_keys
  pair_base = value_base + spec.num_values
  keys = np.argsort(rng.random((rows, spec.num_keys)), axis=1)[:, :spec.num_pairs]
  values = rng.integers(0, spec.num_values, (rows, spec.num_pairs))
  pairs = pair_base + keys * spec.num_values + values
  order = np.argsort(rng.random((rows, spec.num_pairs)), axis=1)[:, :spec.num_queries]
  queries = np.stack([key_base + np.take_along_axis(keys, order, 1),
                      value_base + np.take_along_axis(values, order, 1)], axis=2)
  sequence = np.concatenate([pairs, queries.reshape(rows, -1)], axis=1)
  scored = np.zeros_like(sequence, bool)
  scored[:, spec.num_pairs + 1::2] = True
  return _next_token_rows(sequence, scored)


def induction_rows(spec: TaskSpec, rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
  """[filler (f)] segment [filler (max_filler - f)] segment [pad]: f uniform in 0..max_filler per row;
  tokens 1..V-1 (0 pads the end)."""
  m, total = spec.segment_len, spec.seq_len
  segment = rng.integers(1, spec.vocab_size, (rows, m))
  sequence = rng.integers(1, spec.vocab_size, (rows, total))
  first = rng.integers(0, spec.max_filler + 1, rows)
  second = np.full(rows, m + spec.max_filler)
  positions = np.arange(m)
  row_index = np.arange(rows)[:, None]
  sequence[row_index, first[:, None] + positions] = segment
  sequence[row_index, second[:, None] + positions] = segment
  sequence[:, second[0] + m:] = 0
  scored = np.zeros_like(sequence, bool)
  scored[row_index, second[:, None] + positions[1:]] = True
  return _next_token_rows(sequence, scored)


ROW_MAKERS: dict[str, Callable[[TaskSpec, np.random.Generator, int], dict[str, np.ndarray]]] = {
    "mqar": mqar_rows, "lookup": lookup_rows, "induction": induction_rows}


def _next_token_rows(sequence: np.ndarray, scored: np.ndarray,
                     answers: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Language-model rows: inputs sequence[:-1], targets answers[1:] (default: the sequence itself), and
  the mask of scored targets."""
  answers = sequence if answers is None else answers
  return {"inputs": sequence[:, :-1].astype(np.int32), "targets": answers[:, 1:].astype(np.int32),
          "mask": scored[:, 1:]}


@dataclasses.dataclass(frozen=True)
class Preset:
  """A task shape with its training budget and model width."""
  spec: TaskSpec
  steps: int
  batch_size: int = 64
  lr: float = 3e-3
  warmup_steps: int = 100
  embed_dim: int = 64       # the complex width d (residual 2d)
  num_layers: int = 2
  num_heads: int = 4
  eval_rows: int = 1024
  eval_every: int = 250


# "small": 2 layers, d=32 (residual 64), 2 heads, AdamW at 1e-3: a few minutes of 2 CPU cores each. In a
# sweep at this width a standard GPT learned MQAR small in about 1,000 steps at 1e-3 and not in 2,500 at
# 3e-3 (docs/MODEL.md). "medium" and "hard": more pairs, longer rows, twice the width (the report's sweep).
SMALL = dict(embed_dim=32, num_heads=2, lr=1e-3)
PRESETS: dict[str, dict[str, Preset]] = {
    "mqar": {
        "small": Preset(TaskSpec("mqar", vocab_size=64, num_pairs=4, num_queries=4), steps=3000, **SMALL),
        "medium": Preset(TaskSpec("mqar", vocab_size=128, num_pairs=8, num_queries=8), steps=6000, lr=1e-3),
        "hard": Preset(TaskSpec("mqar", vocab_size=256, num_pairs=16, num_queries=16), steps=8000, lr=1e-3),
    },
    "lookup": {
        "small": Preset(TaskSpec("lookup", vocab_size=0, num_pairs=8, num_queries=8, num_keys=16, num_values=8),
                        steps=2000, **SMALL),
        "hard": Preset(TaskSpec("lookup", vocab_size=0, num_pairs=16, num_queries=16, num_keys=32,
                                num_values=16), steps=4000, lr=1e-3),
    },
    "induction": {
        "small": Preset(TaskSpec("induction", vocab_size=64, segment_len=12, max_filler=16), steps=2000, **SMALL),
        "hard": Preset(TaskSpec("induction", vocab_size=128, segment_len=24, max_filler=40), steps=4000, lr=1e-3),
    },
}


def vocab_size(spec: TaskSpec) -> int:
  if spec.task == "lookup":
    return 1 + spec.num_keys + spec.num_values + spec.num_keys * spec.num_values
  return spec.vocab_size


def model_config(preset: Preset, variant: str, seed: int, overrides: dict[str, Any] | None = None
                 ) -> ml_collections.ConfigDict:
  """The tiny config reshaped for the task, with the variant's switches and the run's seed."""
  config = default_config()
  length = preset.spec.seq_len - 1
  apply_overrides(config, {
      "seed": seed, "model.vocab_size": vocab_size(preset.spec), "model.embed_dim": preset.embed_dim,
      "model.num_layers": preset.num_layers, "model.num_heads": preset.num_heads, "model.max_seq_len": length,
      "data.max_length": length, "data.stride": length, "eval.max_length": length, "eval.stride": length,
      "training.lr": preset.lr, "training.warmup_steps": preset.warmup_steps, "training.total_steps": preset.steps,
      "training.batch_size": preset.batch_size,
  }, "recall preset")
  apply_overrides(config, VARIANTS[variant], f"variant {variant}")
  apply_overrides(config, overrides or {}, "--set")
  return validate(config)


def make_rows(spec: TaskSpec, seed: int, rows: int) -> dict[str, np.ndarray]:
  return ROW_MAKERS[spec.task](spec, np.random.default_rng(seed), rows)


def accuracy(model: Any, batch: dict[str, np.ndarray], batch_size: int = 256) -> float:
  """Share of scored targets whose argmax prediction is right."""
  hits = total = 0
  forward = jax.jit(lambda m, x: jnp.argmax(m(x), axis=-1))
  for start in range(0, len(batch["inputs"]), batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in batch.items()}
    predicted = np.asarray(forward(model, jnp.asarray(chunk["inputs"])))
    hits += int(np.sum((predicted == chunk["targets"]) & chunk["mask"]))
    total += int(np.sum(chunk["mask"]))
  return hits / max(total, 1)


def attention_entropy(model: Any, batch: dict[str, np.ndarray], rows: int = 64) -> dict[str, list[float]]:
  """Per layer (mean over heads): over all query positions t >= 1, and at the scored positions only."""
  probs = layer_traces(model, jnp.asarray(batch["inputs"][:rows]))["attention"]  # (layers, B, H, L, L)
  everywhere = normalized_entropy(probs).mean(axis=1)
  logp = np.log(np.where(probs > 0, probs, 1.0))
  entropy = -np.sum(probs * logp, axis=-1)  # (layers, B, H, L)
  uniform = np.log(np.arange(1, probs.shape[-1] + 1, dtype=np.float64))
  relative = entropy / np.where(uniform > 0, uniform, 1.0)
  mask = batch["mask"][:rows][None, :, None, :]
  at_scored = np.sum(relative * mask, axis=(1, 2, 3)) / np.maximum(np.sum(mask) * probs.shape[2], 1)
  return {"all": everywhere.round(4).tolist(), "scored": at_scored.round(4).tolist()}


def train_and_score(task: str, preset_name: str, variant: str, seed: int, *,
                    overrides: dict[str, Any] | None = None, steps: int | None = None, lr: float | None = None,
                    progress: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains `variant` on the task's preset from `seed` and scores it on held-out rows; the result record."""
  from neon_qtg_jax.training import train_step  # pylint: disable=import-outside-toplevel
  preset = PRESETS[task][preset_name]
  if steps is not None or lr is not None:
    total = steps or preset.steps  # a shorter run warms up over at most half of it (the cosine needs steps left)
    preset = dataclasses.replace(preset, steps=total, lr=lr or preset.lr,
                                 warmup_steps=min(preset.warmup_steps, total // 2))
  config = model_config(preset, variant, seed, overrides)
  spec = preset.spec
  held_out = make_rows(spec, seed + HELD_OUT_STREAM, preset.eval_rows)
  sharding = ShardingConfig.from_config(config.parallel)
  graphdef, state = train_step.create_train_state(config, jax.random.key(seed), sharding)
  step_fn = train_step.make_train_step(config, graphdef, sharding)
  rng = np.random.default_rng(seed)
  curve: list[dict[str, float]] = []
  started = time.perf_counter()
  loss = float("nan")
  for step in range(1, preset.steps + 1):
    batch = ROW_MAKERS[spec.task](spec, rng, preset.batch_size)
    state, metrics = step_fn(state, batch)
    if step % preset.eval_every == 0 or step == preset.steps:
      loss = float(metrics["ce"])
      acc = accuracy(nnx.merge(graphdef, state.params), held_out)
      curve.append({"step": step, "train_ce": loss, "accuracy": acc})
      elapsed = time.perf_counter() - started
      eta = elapsed / step * (preset.steps - step)
      progress(f"{task}/{preset_name}/{variant}/seed{seed}: step {step}/{preset.steps} train ce {loss:.4f} "
               f"held-out accuracy {acc:.3f} | {step / elapsed:.1f} steps/s, ETA {eta:.0f} s")
  seconds = time.perf_counter() - started
  model = nnx.merge(graphdef, state.params)
  entropy = attention_entropy(model, held_out)
  scales = {name: np.asarray(jax.device_get(v)).round(4).tolist()
            for name, v in model.learned_scales().items()}
  final = curve[-1]["accuracy"]
  reached = next((p["step"] for p in curve if p["accuracy"] >= 0.95), None)
  return {
      "task": task, "preset": preset_name, "variant": variant, "seed": seed, "accuracy": final,
      "chance": spec.chance, "steps": preset.steps, "steps_to_0.95": reached, "seconds": round(seconds, 1),
      "attention_entropy": entropy["all"], "attention_entropy_scored": entropy["scored"],
      "learned_scales": scales, "train_ce": loss, "curve": curve, "lr": preset.lr,
      "batch_size": preset.batch_size, "task_spec": dataclasses.asdict(spec), "seq_len": spec.seq_len,
      "model": {"embed_dim": preset.embed_dim, "num_layers": preset.num_layers, "num_heads": preset.num_heads,
                "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))},
      "overrides": dict(VARIANTS[variant]) | dict(overrides or {}),
  }
