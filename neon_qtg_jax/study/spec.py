"""A study file and the runs it expands to.

A study file is a Python module with `get_study() -> dict`:

  name, base_config (a config file), overrides (every run), baseline (a variant name present
  in every group), notes (caveats for the report), groups: a list of
    {name, title, overrides, budget, variants: [{name, label, overrides, seeds, tier}]}

Overrides map dotted config fields to values ("model.attention": "dot"). A budget is
{"kind": "tokens", "steps": N}, {"kind": "flops", "steps": N, "reference": VARIANT} (every
variant gets the training FLOPs of N steps of the reference, from info.flops_per_token), or
{"kind": "wall_time", "minutes": M, "max_steps": N}. Runs are ordered by tier, then seed,
then group and variant, so the most important comparisons finish first.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from neon_qtg_jax import info
from neon_qtg_jax.config import ConfigError, apply_overrides, validate

BUDGET_KINDS = ("tokens", "flops", "wall_time")


@dataclasses.dataclass
class Run:
  group: str
  variant: str
  label: str
  seed: int
  tier: int
  overrides: dict[str, Any]   # group and variant overrides (what distinguishes the run)
  config: ml_collections.ConfigDict
  budget: dict[str, Any]
  order: tuple[int, ...] = ()  # (tier, seed, group index, variant index)

  @property
  def key(self) -> str:
    return f"{self.group}/{self.variant}/seed{self.seed}"


def load_module(path: str) -> Any:
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"{path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_study(path: str) -> dict[str, Any]:
  """The study dict of a study file, checked for the fields every study needs."""
  study = load_module(path).get_study()
  for field in ("name", "base_config", "baseline", "groups"):
    if field not in study:
      raise ValueError(f"{path}: the study has no '{field}'")
  for group in study["groups"]:
    names = [v["name"] for v in group["variants"]]
    if study["baseline"] not in names:
      raise ValueError(f"{path}: group '{group['name']}' has no baseline variant '{study['baseline']}'")
    budget = group["budget"]
    if budget.get("kind") not in BUDGET_KINDS:
      raise ValueError(f"{path}: group '{group['name']}': budget kind must be one of {BUDGET_KINDS}")
    if budget["kind"] == "flops" and budget.get("reference") not in names:
      raise ValueError(f"{path}: group '{group['name']}': the FLOPs budget's reference must be one of {names}")
  return study


def base_config(study: dict[str, Any]) -> ml_collections.ConfigDict:
  config = load_module(study["base_config"]).get_config()
  apply_overrides(config, study.get("overrides", {}), "study overrides")
  return config


def train_flops_per_step(config: ml_collections.ConfigDict) -> float:
  t = config.training
  return info.flops_per_token(config)["train"] * t.batch_size * t.grad_accum_steps * config.data.max_length


def _variant_config(study: dict[str, Any], group: dict[str, Any], variant: dict[str, Any]) -> ml_collections.ConfigDict:
  config = base_config(study)
  apply_overrides(config, group.get("overrides", {}), f"group {group['name']}")
  apply_overrides(config, variant.get("overrides", {}), f"variant {group['name']}/{variant['name']}")
  return config


def budget_steps(study: dict[str, Any], group: dict[str, Any], config: ml_collections.ConfigDict) -> int:
  """Optimizer steps that give this variant the group's budget (the step cap for wall-time budgets)."""
  budget = group["budget"]
  if budget["kind"] == "tokens":
    return int(budget["steps"])
  if budget["kind"] == "wall_time":
    return int(budget["max_steps"])
  reference = next(v for v in group["variants"] if v["name"] == budget["reference"])
  total = train_flops_per_step(_variant_config(study, group, reference)) * budget["steps"]
  return max(1, round(total / train_flops_per_step(config)))


def expand(study: dict[str, Any]) -> list[Run]:
  """Every run of the study with its validated config, most important first."""
  runs = []
  for group_index, group in enumerate(study["groups"]):
    for variant_index, variant in enumerate(group["variants"]):
      config = _variant_config(study, group, variant)
      t = config.training
      t.total_steps = budget_steps(study, group, config)
      t.warmup_steps = min(t.warmup_steps, t.total_steps)
      # About six validation points per run for the curves, and one checkpoint at the end.
      t.eval_steps = max(1, t.total_steps // 6)
      t.save_steps = t.total_steps
      if group["budget"]["kind"] == "wall_time":
        t.max_train_minutes = float(group["budget"]["minutes"])
      seeds = variant.get("seeds", 1)
      for seed in (range(seeds) if isinstance(seeds, int) else seeds):
        run_config = ml_collections.ConfigDict(config.to_dict())
        run_config.seed = int(seed)
        run_config.data.shuffle_seed = int(seed)
        where = f"{group['name']}/{variant['name']}/seed{seed}"
        try:
          validate(run_config)
        except ConfigError as err:
          raise ConfigError(f"{where}: {err}") from err
        overrides = dict(group.get("overrides", {})) | dict(variant.get("overrides", {}))
        tier = int(variant.get("tier", 1))
        runs.append(Run(group["name"], variant["name"], variant.get("label", variant["name"]), int(seed), tier,
                        overrides, run_config, dict(group["budget"]), (tier, int(seed), group_index, variant_index)))
  runs.sort(key=lambda r: r.order)
  return runs
