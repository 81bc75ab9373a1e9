"""Train-step throughput on the current devices, and the cost of QTG over a plain GPT of equal dimensions."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from neon_qtg_jax.parallel import ShardingConfig
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


class CompiledStep:
  """The real train step compiled for `config`, with its state and a fixed batch of random tokens."""

  def __init__(self, config: ml_collections.ConfigDict, name: str, seed: int = 0):
    t = config.training
    rows, length = t.batch_size * t.grad_accum_steps, config.data.max_length
    tokens = np.random.default_rng(seed).integers(0, config.model.vocab_size, (rows, length + 1)).astype(np.int32)
    self.batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    sharding = ShardingConfig.from_config(config.parallel)
    graphdef, self.state = ts.create_train_state(config, jax.random.PRNGKey(seed), sharding)
    self.name = name
    self.params = sum(x.size for x in jax.tree.leaves(self.state.params))
    self.tokens_per_step = ts.tokens_per_step(config)
    began = time.perf_counter()
    self.step: Callable = ts.make_train_step(config, graphdef, sharding).lower(self.state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - began
    self.durations: list[float] = []

  def run(self, timed: bool = True) -> None:
    began = time.perf_counter()
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)
    if timed:
      self.durations.append(time.perf_counter() - began)

  def timing(self) -> StepTiming:
    return StepTiming(self.name, self.params, self.tokens_per_step, self.compile_seconds,
                      float(np.median(self.durations)))


def time_steps(configs: dict[str, ml_collections.ConfigDict], *, steps: int = 10, warmup: int = 2
               ) -> dict[str, StepTiming]:
  """Median step time of each config; the steps of all configs alternate, so load changes hit them alike."""
  compiled = [CompiledStep(config, name) for name, config in configs.items()]
  for _ in range(warmup):
    for c in compiled:
      c.run(timed=False)
  for _ in range(steps):
    for c in compiled:
      c.run()
  return {c.name: c.timing() for c in compiled}


def compare_with_gpt(config: ml_collections.ConfigDict, name: str, **kwargs) -> tuple[StepTiming, StepTiming]:
  """(QTG timing, GPT-baseline timing) at the same dimensions, measured in this process, steps interleaved."""
  gpt_name = f"{name} GPT baseline"
  timings = time_steps({name: config, gpt_name: gpt_baseline(config)}, **kwargs)
  return timings[name], timings[gpt_name]
