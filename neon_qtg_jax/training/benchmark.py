"""Train-step throughput on the current devices, and the cost of QTG over a plain GPT of equal dimensions."""

from __future__ import annotations

import dataclasses
import time

import jax
import ml_collections
import numpy as np

from neon_qtg_jax.training import train_step as ts


@dataclasses.dataclass(frozen=True)
class StepTiming:
  name: str
  params: int
  tokens_per_step: int
  compile_seconds: float
  step_seconds: float         # median over the timed steps

  @property
  def tokens_per_second(self) -> float:
    return self.tokens_per_step / self.step_seconds


def gpt_baseline(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same dimensions as a plain GPT: dot-product attention, no TopoFilter, cross-entropy only."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.attention = "dot"
  c.model.topofilter = False
  c.training.lambda_topo = c.training.lambda_geo = c.training.lambda_quantum = 0.0
  return c


def time_train_step(config: ml_collections.ConfigDict, name: str, *, steps: int = 10, warmup: int = 2,
                    seed: int = 0) -> StepTiming:
  """Compiles the real train step and times `steps` calls after `warmup` untimed ones, on random tokens."""
  t = config.training
  rows, length = t.batch_size * t.grad_accum_steps, config.data.max_length
  tokens = np.random.default_rng(seed).integers(0, config.model.vocab_size, (rows, length + 1)).astype(np.int32)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  graphdef, state = ts.create_train_state(config, jax.random.PRNGKey(seed))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  step = ts.make_train_step(config, graphdef)
  began = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - began
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  durations = []
  for _ in range(steps):
    began = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    durations.append(time.perf_counter() - began)
  return StepTiming(name, params, ts.tokens_per_step(config), compile_seconds, float(np.median(durations)))


def compare_with_gpt(config: ml_collections.ConfigDict, name: str, **kwargs) -> tuple[StepTiming, StepTiming]:
  """(QTG timing, GPT-baseline timing) at the same dimensions, measured in this process one after the other."""
  return time_train_step(config, name, **kwargs), time_train_step(gpt_baseline(config), f"{name} GPT baseline",
                                                                  **kwargs)
