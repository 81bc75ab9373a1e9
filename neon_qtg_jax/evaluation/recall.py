"""Associative recall: synthetic tasks that only input-dependent token selection solves.

Three tasks, generated in process from a seed (numpy), each row a token sequence with a mask of
the scored targets:

  mqar     multi-query associative recall as Zoology generates it (Arora et al., 2023,
           `multiquery_ar`): N (key, value) pairs "k1 v1 k2 v2 ...", keys drawn without replacement
           from [1, V/2) and values without replacement from [V/2, V) (distinct within a row), then
           every key once more as a query, at positions 2 * gap after the pairs with the gaps drawn
           without replacement from a power law (a = 0.01: most queries come soon after the pairs),
           and random tokens everywhere else. Scored: the prediction at each query (its value). No
           answer is ever shown after a query.
  lookup   one-token lookup: C context tokens, each one token that encodes a (key, value) pair with
           values distinct within a row, then Q keys, each followed by a blank (the answer is not
           shown, so answered values cannot be eliminated). The query must find its pair by content.
  induction  a random segment, filler, the same segment again; the filler's length varies per row,
           so the offset of the repeat does too and position alone does not solve it. Scored: every
           token of the repeat after its first.

Beside chance, each task reports `no_recall_floor`: the accuracy, on the same held-out rows, of the
best predictor that uses no key matching (`no_recall_predictions`: the most frequent candidate answer
in the prefix, ties split evenly). A result is recall only above it. Induction also reports what a
one-token and a two-token induction head reach (`induction_head_accuracy`), which bound what the task
allows.

A model is trained with the project's own train step (AdamW, warmup-cosine, clipping, the
variant's loss) on freshly generated rows (the training stream, the seed), tuned and stopped early on
rows of the tuning stream (seed + TUNE_STREAM), and scored on rows of the held-out stream (seed +
HELD_OUT_STREAM) that nothing else sees: accuracy of the argmax at the scored positions and the
attention entropy per layer relative to uniform attention over the prefix (analysis.normalized_entropy).
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
TUNE_STREAM = 500_009        # tuning rows (learning-rate grid, early stopping) come from seed + this
HELD_OUT_STREAM = 1_000_003  # the reported accuracy's rows come from seed + this: a stream nothing else reads
SOLVED = 0.99                # the accuracy at which a run counts as having solved its setting
POWER_A = 0.01               # Zoology's power law of the query gaps


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task's shape. mqar: num_pairs N in rows of length tokens (input length), vocab split in keys and
  values. lookup: num_pairs C context pair tokens over num_keys x num_values, num_queries Q. induction: a
  segment of segment_len tokens repeated after 0..max_filler filler tokens, padded to seq_len."""
  task: str
  vocab_size: int
  num_pairs: int = 0
  num_queries: int = 0
  num_keys: int = 0
  num_values: int = 0
  segment_len: int = 0
  max_filler: int = 0
  length: int = 0            # mqar: tokens per row given to the model (Zoology's input_seq_len)

  @property
  def seq_len(self) -> int:
    """Tokens per generated row (inputs and targets are one shorter)."""
    if self.task == "mqar":
      return self.length + 1
    if self.task == "lookup":
      return self.num_pairs + 2 * self.num_queries
    return 2 * self.segment_len + self.max_filler + 1

  @property
  def chance(self) -> float:
    """Accuracy of guessing among what the context offers: one of the N (C) values, or a uniform token."""
    if self.task in ("mqar", "lookup"):
      return 1.0 / self.num_pairs
    return 1.0 / self.vocab_size

  def check(self) -> None:
    """ValueError naming the field when the shape cannot be generated."""
    if self.task == "mqar":
      if self.vocab_size // 2 - 1 < self.num_pairs or self.vocab_size - self.vocab_size // 2 < self.num_pairs:
        raise ValueError(f"mqar: vocab_size={self.vocab_size} has too few keys or values for {self.num_pairs} pairs")
      if (self.length - 2 * self.num_pairs) // 2 < self.num_pairs:
        raise ValueError(f"mqar: length={self.length} leaves no room for {self.num_pairs} queries after the pairs")
    if self.task == "lookup" and (self.num_values < self.num_pairs or self.num_keys < self.num_pairs):
      raise ValueError(f"lookup: {self.num_pairs} pairs need as many distinct keys and values "
                       f"(num_keys={self.num_keys}, num_values={self.num_values})")


def _distinct(rng: np.random.Generator, rows: int, low: int, high: int, count: int) -> np.ndarray:
  """(rows, count) integers from [low, high), distinct within each row."""
  return np.argsort(rng.random((rows, high - low)), axis=1)[:, :count] + low


def mqar_rows(spec: TaskSpec, rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
  """Zoology's multiquery_ar: pairs, then each key queried once at a power-law gap, random tokens elsewhere."""
  n, half, total = spec.num_pairs, spec.vocab_size // 2, spec.seq_len
  keys = _distinct(rng, rows, 1, half, n)
  values = _distinct(rng, rows, half, spec.vocab_size, n)
  space = (spec.length - 2 * n) // 2
  weights = POWER_A * np.arange(1, space + 1) ** (POWER_A - 1)
  # n gaps without replacement, each draw in proportion to the weights (Gumbel top-k = successive sampling)
  gumbel = np.log(weights / weights.sum()) - np.log(-np.log(rng.random((rows, space))))
  gaps = np.argsort(-gumbel, axis=1)[:, :n]
  sequence = rng.integers(0, spec.vocab_size, (rows, total))  # Zoology's random non-query tokens
  sequence[:, 0:2 * n:2], sequence[:, 1:2 * n:2] = keys, values
  queries = 2 * n + 2 * gaps
  row_index = np.arange(rows)[:, None]
  sequence[row_index, queries] = keys
  answers = sequence.copy()
  answers[row_index, queries + 1] = values
  scored = np.zeros_like(sequence, bool)
  scored[row_index, queries + 1] = True
  return _next_token_rows(sequence, scored, answers)


def lookup_rows(spec: TaskSpec, rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
  """Tokens: 0 blank, 1..K keys, then values, then the K x W pair tokens. Values distinct within a row."""
  key_base, value_base = 1, 1 + spec.num_keys
  pair_base = value_base + spec.num_values
  keys = _distinct(rng, rows, 0, spec.num_keys, spec.num_pairs)
  values = _distinct(rng, rows, 0, spec.num_values, spec.num_pairs)
  pairs = pair_base + keys * spec.num_values + values
  order = np.argsort(rng.random((rows, spec.num_pairs)), axis=1)[:, :spec.num_queries]
  queried = key_base + np.take_along_axis(keys, order, 1)
  blanks = np.zeros_like(queried)
  sequence = np.concatenate([pairs, np.stack([queried, blanks], axis=2).reshape(rows, -1)], axis=1)
  answers = np.concatenate([pairs, np.stack([queried, value_base + np.take_along_axis(values, order, 1)],
                                            axis=2).reshape(rows, -1)], axis=1)
  scored = np.zeros_like(sequence, bool)
  scored[:, spec.num_pairs + 1::2] = True
  return _next_token_rows(sequence, scored, answers)


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


def _candidates(spec: TaskSpec, inputs: np.ndarray) -> np.ndarray:
  """The candidate answer each input token stands for without any key matching, -1 for none: a value in the
  pairs (mqar: where the values stand is known without matching keys; random tokens elsewhere are not
  candidates), the value a pair token holds (lookup), the token itself (induction)."""
  if spec.task == "mqar":
    out = np.full_like(inputs, -1)
    out[:, 1:2 * spec.num_pairs:2] = inputs[:, 1:2 * spec.num_pairs:2]
    return out
  if spec.task == "lookup":
    pair_base = 1 + spec.num_keys + spec.num_values
    return np.where(inputs >= pair_base, 1 + spec.num_keys + (inputs - pair_base) % spec.num_values, -1)
  return inputs


def no_recall_predictions(spec: TaskSpec, rows: dict[str, np.ndarray]) -> float:
  """Expected accuracy of the most frequent candidate answer in the prefix (ties split evenly): what a model
  reaches on these rows with no key matching. Answers are never shown, so nothing can be eliminated."""
  candidates = _candidates(spec, rows["inputs"])
  hits = 0.0
  for row, position in zip(*np.nonzero(rows["mask"])):
    seen = candidates[row, :position + 1]
    seen = seen[seen >= 0]
    if seen.size == 0:
      continue
    tokens, counts = np.unique(seen, return_counts=True)
    best = tokens[counts == counts.max()]
    hits += float(rows["targets"][row, position] in best) / len(best)
  return hits / max(int(rows["mask"].sum()), 1)


def induction_head_accuracy(rows: dict[str, np.ndarray], order: int) -> float:
  """Accuracy of an induction head matching the last `order` tokens: it predicts the token that followed
  their most recent earlier occurrence (no occurrence: wrong)."""
  inputs = rows["inputs"]
  hits = 0
  for row, position in zip(*np.nonzero(rows["mask"])):
    sequence = inputs[row, :position + 1]
    pattern = sequence[-order:]
    prediction = None
    for start in range(position - order, -1, -1):  # the earlier occurrence's last token is at start + order - 1
      if start + order < position + 1 and (sequence[start:start + order] == pattern).all():
        prediction = sequence[start + order]
        break
    hits += int(prediction is not None and prediction == rows["targets"][row, position])
  return hits / max(int(rows["mask"].sum()), 1)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A task shape with its training budget and model width. lr is per variant (chosen on the tuning
  stream by tools/recall.py --tune; default_lr for a variant not in it)."""
  spec: TaskSpec
  steps: int
  batch_size: int = 64
  lr: tuple[tuple[str, float], ...] = ()
  default_lr: float = 1e-3
  warmup_steps: int = 100
  width: int = 64           # the residual stream (2 x model.embed_dim)
  num_layers: int = 2
  num_heads: int = 2
  eval_rows: int = 1024
  eval_every: int = 250
  stop_at: float = 0.999    # stop early once the tuning rows reach this accuracy at two evaluations in a row

  def lr_for(self, variant: str) -> float:
    return dict(self.lr).get(variant, self.default_lr)


def mqar_preset(num_pairs: int, width: int = 64, steps: int = 4000) -> Preset:
  """MQAR at num_pairs over Zoology's vocabulary split: vocab 256 (512 from 64 pairs), rows of max(32, 4 x
  num_pairs) tokens (from 8 pairs the queries fill the rest of the row in random order), one head.

  Found while setting the gate (docs/RESULTS.md, "Recall: the settings"), `gpt_spec`, lr 1e-3, seed 0: at 4
  pairs in rows of 64 tokens (48 random) it stayed on the floor after 3,000 steps (width 64 and 128, 2 heads;
  also at lr 3e-3); in rows of 32, 2 heads of 16 (width 64) stayed on the floor and one head of 32 solved it
  by step 1,750. At 8 pairs in rows of 32, width 64 stayed near the floor after 4,000 steps (0.18; also at
  lr 3e-3) and width 128 reached 0.956 by step 2,500.
  """
  spec = TaskSpec("mqar", vocab_size=256 if num_pairs < 64 else 512, num_pairs=num_pairs,
                  num_queries=num_pairs, length=max(32, 4 * num_pairs))
  return Preset(spec, steps=steps, width=width, num_heads=1, lr=MQAR_LR)


# The learning rate per variant, chosen by `tools/recall.py --tune --grid=1e-3,3e-3` on the tuning stream of
# MQAR small (4 pairs, width 64, seed 0; docs/results/recall_tune, docs/RESULTS.md "Recall: the settings");
# the held-out accuracy never takes part.
MQAR_LR: tuple[tuple[str, float], ...] = (("gpt_spec", 1e-3), ("qtg", 1e-3), ("qtg_cosine", 1e-3), ("qtg_dot", 3e-3),
                                          ("qtg_seed", 3e-3))
MQAR_PAIRS = (4, 8, 16, 32, 64)
SWEEP_WIDTHS = (64, 128)
PRESETS: dict[str, dict[str, Preset]] = {
    "mqar": {"small": mqar_preset(4), "medium": mqar_preset(16), "hard": mqar_preset(64)}
            | {f"pairs{n}": mqar_preset(n) for n in MQAR_PAIRS},
    "lookup": {
        "small": Preset(TaskSpec("lookup", vocab_size=0, num_pairs=8, num_queries=8, num_keys=16, num_values=8),
                        steps=2000),
        "hard": Preset(TaskSpec("lookup", vocab_size=0, num_pairs=16, num_queries=16, num_keys=32,
                                num_values=16), steps=4000, width=128),
    },
    "induction": {
        "small": Preset(TaskSpec("induction", vocab_size=64, segment_len=12, max_filler=16), steps=2000),
        "hard": Preset(TaskSpec("induction", vocab_size=128, segment_len=24, max_filler=40), steps=4000, width=128),
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
      "seed": seed, "model.vocab_size": vocab_size(preset.spec), "model.embed_dim": preset.width // 2,
      "model.num_layers": preset.num_layers, "model.num_heads": preset.num_heads, "model.max_seq_len": length,
      "data.max_length": length, "data.stride": length, "eval.max_length": length, "eval.stride": length,
      "training.lr": preset.lr_for(variant), "training.warmup_steps": preset.warmup_steps,
      "training.total_steps": preset.steps, "training.batch_size": preset.batch_size,
  }, "recall preset")
  apply_overrides(config, VARIANTS[variant], f"variant {variant}")
  apply_overrides(config, overrides or {}, "--set")
  return validate(config)


def make_rows(spec: TaskSpec, seed: int, rows: int) -> dict[str, np.ndarray]:
  return ROW_MAKERS[spec.task](spec, np.random.default_rng(seed), rows)


@jax.jit
def _predict(model: Any, tokens: jax.Array) -> jax.Array:
  """argmax tokens (B, L); one jit for every call (a lambda jitted per call compiled again at each evaluation)."""
  return jnp.argmax(model(tokens), axis=-1)


def accuracy(model: Any, batch: dict[str, np.ndarray], batch_size: int = 256) -> float:
  """Share of scored targets whose argmax prediction is right."""
  hits = total = 0
  for start in range(0, len(batch["inputs"]), batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in batch.items()}
    predicted = np.asarray(_predict(model, jnp.asarray(chunk["inputs"])))
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


def floors(spec: TaskSpec, rows: dict[str, np.ndarray]) -> dict[str, float]:
  """What the rows allow without recall (no_recall_floor) and, for induction, with one- and two-token heads."""
  out = {"chance": spec.chance, "no_recall_floor": round(no_recall_predictions(spec, rows), 4)}
  if spec.task == "induction":
    out |= {"induction_head_1": round(induction_head_accuracy(rows, 1), 4),
            "induction_head_2": round(induction_head_accuracy(rows, 2), 4)}
  return out


def solved_bar(record: dict[str, Any]) -> float:
  """The accuracy a run must reach to count as solved: SOLVED, or for induction what a two-token head reaches
  on the same rows when that is lower (the task allows no more)."""
  return min(SOLVED, record.get("induction_head_2", SOLVED))


def train_and_score(task: str, preset: Preset | str, variant: str, seed: int, *,
                    overrides: dict[str, Any] | None = None, steps: int | None = None, lr: float | None = None,
                    score_held_out: bool = True, progress: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains `variant` on the task's preset from `seed`; the result record.

  Progress and early stopping read the tuning rows; the reported `accuracy` is on the held-out rows
  (score_held_out=False leaves them unread: a tuning run).
  """
  from neon_qtg_jax.training import train_step  # pylint: disable=import-outside-toplevel
  preset_name = preset if isinstance(preset, str) else f"pairs{preset.spec.num_pairs}"
  preset = PRESETS[task][preset] if isinstance(preset, str) else preset
  preset.spec.check()
  if steps is not None or lr is not None:
    total = steps or preset.steps  # a shorter run warms up over at most half of it (the cosine needs steps left)
    preset = dataclasses.replace(preset, steps=total, warmup_steps=min(preset.warmup_steps, total // 2),
                                 lr=((variant, lr or preset.lr_for(variant)),))
  config = model_config(preset, variant, seed, overrides)
  spec = preset.spec
  tuning = make_rows(spec, seed + TUNE_STREAM, preset.eval_rows)
  sharding = ShardingConfig.from_config(config.parallel)
  graphdef, state = train_step.create_train_state(config, jax.random.key(seed), sharding)
  step_fn = train_step.make_train_step(config, graphdef, sharding)
  rng = np.random.default_rng(seed)
  curve: list[dict[str, float]] = []
  started = time.perf_counter()
  loss = float("nan")
  step = 0
  for step in range(1, preset.steps + 1):
    batch = ROW_MAKERS[spec.task](spec, rng, preset.batch_size)
    state, metrics = step_fn(state, batch)
    if step % preset.eval_every == 0 or step == preset.steps:
      loss = float(metrics["ce"])
      acc = accuracy(nnx.merge(graphdef, state.params), tuning)
      curve.append({"step": step, "train_ce": loss, "tune_accuracy": acc})
      elapsed = time.perf_counter() - started
      eta = elapsed / step * (preset.steps - step)
      progress(f"{task}/{preset_name}/w{preset.width}/{variant}/seed{seed}: step {step}/{preset.steps} train ce "
               f"{loss:.4f} tuning accuracy {acc:.3f} | {step / elapsed:.1f} steps/s, ETA {eta:.0f} s")
      if len(curve) >= 2 and min(p["tune_accuracy"] for p in curve[-2:]) >= preset.stop_at:
        break
  seconds = time.perf_counter() - started
  model = nnx.merge(graphdef, state.params)
  record: dict[str, Any] = {
      "task": task, "preset": preset_name, "variant": variant, "seed": seed, "width": preset.width,
      "num_pairs": spec.num_pairs, "tune_accuracy": curve[-1]["tune_accuracy"], "steps": step,
      "max_steps": preset.steps, "seconds": round(seconds, 1), "train_ce": loss, "curve": curve,
      "lr": config.training.lr, "batch_size": preset.batch_size, "task_spec": dataclasses.asdict(spec),
      "seq_len": spec.seq_len,
      "steps_to_solved": next((p["step"] for p in curve if p["tune_accuracy"] >= SOLVED), None),
      "model": {"width": preset.width, "embed_dim": preset.width // 2, "num_layers": preset.num_layers,
                "num_heads": preset.num_heads,
                "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))},
      "overrides": dict(VARIANTS[variant]) | dict(overrides or {}),
      "learned_scales": {name: np.asarray(jax.device_get(v)).round(4).tolist()
                         for name, v in model.learned_scales().items()},
  }
  if score_held_out:
    held_out = make_rows(spec, seed + HELD_OUT_STREAM, preset.eval_rows)
    entropy = attention_entropy(model, held_out)
    record |= {"accuracy": accuracy(model, held_out), **floors(spec, held_out),
               "attention_entropy": entropy["all"], "attention_entropy_scored": entropy["scored"]}
    record["solved"] = record["accuracy"] >= solved_bar(record)
  return record


def tune_lr(task: str, preset: Preset | str, variant: str, grid: tuple[float, ...], seed: int = 0, *,
            overrides: dict[str, Any] | None = None, steps: int | None = None,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
  """The grid's runs scored on the tuning rows only: the chosen lr is the best tuning accuracy, ties broken
  by the fewest steps to SOLVED, then the smaller lr."""
  runs = [train_and_score(task, preset, variant, seed, overrides=overrides, steps=steps, lr=lr, score_held_out=False,
                          progress=progress) for lr in grid]
  best = max(runs, key=lambda r: (round(r["tune_accuracy"], 3), -(r["steps_to_solved"] or math.inf), -r["lr"]))
  return {"variant": variant, "task": task, "preset": best["preset"], "width": best["width"], "grid": list(grid),
          "chosen_lr": best["lr"],
          "runs": [{k: r[k] for k in ("lr", "tune_accuracy", "steps", "steps_to_solved", "seconds")} for r in runs]}
