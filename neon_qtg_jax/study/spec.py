"""A study file and the runs it expands to.

A study file is a Python module with `get_study() -> dict`:

  name, base_config (a config file), overrides (every run), baseline (a variant name present
  in every group), notes (caveats for the report), groups: a list of
    {name, title, overrides, budget, variants: [{name, label, overrides, seeds, tier}]}
  optional, study-wide or per group (a group's own value wins):
    lr_grid      learning rates to choose from per variant, e.g. [1e-3, 3e-3, 1e-2] ([]: no choice,
                 training.lr as configured)
    tune_budget  the budget of each tuning run (default: the group's budget)
    tune_seed    the seed of the tuning runs (default 100; not one of the variant's own seeds)
  optional, per group:
    lr_from      the name of an earlier group with an lr grid: this group runs no tuning of its own, and
                 each of its variants trains with the learning rate chosen for it there
  optional, study-wide: recall_dir (a directory of tools/recall.py JSON results for the report's
  first table; --recall_dir overrides it), headline (the variant set against the baseline first in
  the main result), contrasts (more [a, b] pairs of variant names for the main result, each a
  against b in every group that has both), pictures, title, description.

Overrides map dotted config fields to values ("model.attention": "dot"). A budget is
{"kind": "tokens", "steps": N}, {"kind": "flops", "steps": N, "reference": VARIANT} (every
variant gets the training FLOPs of N steps of the reference, from info.flops_per_token), or
{"kind": "wall_time", "minutes": M, "max_steps": N} (the trainer stops at M minutes, at most N
steps; the learning-rate schedule runs over N steps, so a run the clock stops ends early in it).

With an lr_grid, every group x variant first gets one tuning run per grid value (seed tune_seed,
the tuning budget), scored on the tuning split (data.tune_fraction > 0 is required; the report
never scores that split); the value with the lowest tuning bits/byte is the variant's
training.lr for its seeds (and for its seeds in the groups whose lr_from names this group). Runs
are ordered by tier, then tuning before the seeds, then seed, group and variant, so the most
important comparisons finish first; a group's runs never come before the tuning they wait for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import ml_collections

from neon_qtg_jax import info
from neon_qtg_jax.config import ConfigError, apply_overrides, validate

BUDGET_KINDS = ("tokens", "flops", "wall_time")
PHASES = ("tune", "final")
DEFAULT_TUNE_SEED = 100


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
  order: tuple[int, ...] = ()  # (tier, phase, seed, group index, variant index, grid index)
  phase: str = "final"         # "tune": one grid value, scored on the tuning split; "final": a seed
  lr: float | None = None      # training.lr; None for a final run whose lr the tuning runs choose
  lr_grid: tuple[float, ...] = ()
  lr_group: str = ""           # the group whose tuning runs choose training.lr: its own, or its lr_from

  @property
  def key(self) -> str:
    if self.phase == "tune":
      return f"{self.group}/{self.variant}/tune_lr{self.lr:g}"
    return f"{self.group}/{self.variant}/seed{self.seed}"

  @property
  def pending_lr(self) -> bool:
    """A final run that waits for its tuning runs to choose training.lr."""
    return self.phase == "final" and self.lr is None


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The whole run config as plain JSON values (tuples as lists): what a finished run is compared by."""
  return json.loads(json.dumps(config.to_dict()))


def load_module(path: str) -> Any:
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"{path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _setting(study: dict[str, Any], group: dict[str, Any], name: str, default: Any) -> Any:
  """A group's own value of an optional setting, else the study's, else the default."""
  return group[name] if name in group else study.get(name, default)


def lr_grid(study: dict[str, Any], group: dict[str, Any]) -> tuple[float, ...]:
  """The group's own grid (empty for a group with lr_from: it runs no tuning)."""
  if "lr_from" in group:
    return ()
  return tuple(float(lr) for lr in _setting(study, group, "lr_grid", ()) or ())


def lr_source(study: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
  """The group whose tuning runs choose this group's learning rates: the one its lr_from names, else itself."""
  return next(g for g in study["groups"] if g["name"] == group.get("lr_from", group["name"]))


def tune_budget(study: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
  return dict(_setting(study, group, "tune_budget", group["budget"]))


def tune_seed(study: dict[str, Any], group: dict[str, Any]) -> int:
  return int(_setting(study, group, "tune_seed", DEFAULT_TUNE_SEED))


def _seeds(variant: dict[str, Any]) -> list[int]:
  seeds = variant.get("seeds", 1)
  return [int(s) for s in (range(seeds) if isinstance(seeds, int) else seeds)]


def _check_budget(path: str, where: str, budget: Any, names: list[str]) -> None:
  if not isinstance(budget, dict) or budget.get("kind") not in BUDGET_KINDS:
    raise ValueError(f"{path}: {where}: budget kind must be one of {BUDGET_KINDS}")
  needed = {"tokens": ("steps",), "flops": ("steps", "reference"), "wall_time": ("minutes", "max_steps")}
  for field in needed[budget["kind"]]:
    if field not in budget:
      raise ValueError(f"{path}: {where}: a '{budget['kind']}' budget needs '{field}'")
  if budget["kind"] == "flops" and budget.get("reference") not in names:
    raise ValueError(f"{path}: {where}: the FLOPs budget's reference must be one of {names}")


def load_study(path: str) -> dict[str, Any]:
  """The study dict of a study file, checked for the fields every study needs."""
  study = load_module(path).get_study()
  for field in ("name", "base_config", "baseline", "groups"):
    if field not in study:
      raise ValueError(f"{path}: the study has no '{field}'")
  _check_comparisons(path, study)
  for index, group in enumerate(study["groups"]):
    names = [v["name"] for v in group["variants"]]
    if study["baseline"] not in names:
      raise ValueError(f"{path}: group '{group['name']}' has no baseline variant '{study['baseline']}'")
    _check_budget(path, f"group '{group['name']}'", group.get("budget"), names)
    if "lr_from" in group:
      _check_lr_from(path, study["groups"][:index], group)
      continue
    grid = _setting(study, group, "lr_grid", ()) or ()
    if not isinstance(grid, (list, tuple)) or not all(
        isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 for lr in grid):
      raise ValueError(f"{path}: group '{group['name']}': lr_grid must be a list of learning rates > 0, got {grid!r}")
    if len({f"{lr:g}" for lr in grid}) != len(grid):  # the tuning runs' workdirs are named lr{value:g}
      raise ValueError(f"{path}: group '{group['name']}': lr_grid {grid!r} repeats a value (to 6 digits)")
    if grid:
      _check_budget(path, f"group '{group['name']}' tune_budget", tune_budget(study, group), names)
      seed = tune_seed(study, group)
      for variant in group["variants"]:
        if seed in _seeds(variant):
          raise ValueError(f"{path}: group '{group['name']}': tune_seed {seed} is one of variant "
                           f"'{variant['name']}''s seeds; tuning runs take a seed of their own")
  return study


def comparisons(study: dict[str, Any]) -> list[tuple[str, str]]:
  """The main result's (a, b) pairs, a against b: the headline against the baseline, then the contrasts."""
  pairs = [(study["headline"], study["baseline"])] if study.get("headline") else []
  return pairs + [tuple(pair) for pair in study.get("contrasts", ())]


def _check_comparisons(path: str, study: dict[str, Any]) -> None:
  """Each pair names two different variants that some group runs together."""
  together = [{v["name"] for v in group["variants"]} for group in study["groups"]]
  for pair in study.get("contrasts", ()):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or pair[0] == pair[1]:
      raise ValueError(f"{path}: contrasts: each entry is a pair of two different variant names, got {pair!r}")
  for a, b in comparisons(study):
    if not any({a, b} <= names for names in together):
      raise ValueError(f"{path}: no group runs both '{a}' and '{b}' (the main result compares them)")


def _check_lr_from(path: str, earlier: list[dict[str, Any]], group: dict[str, Any]) -> None:
  """lr_from names an earlier group that tunes every variant of this one, and this group sets no tuning itself."""
  where = f"{path}: group '{group['name']}'"
  for field in ("lr_grid", "tune_budget", "tune_seed"):
    if field in group:
      raise ValueError(f"{where}: '{field}' and 'lr_from' exclude each other (the tuning is the other group's)")
  source = next((g for g in earlier if g["name"] == group["lr_from"]), None)
  if source is None:
    raise ValueError(f"{where}: lr_from {group['lr_from']!r} is not a group listed before it "
                     f"({[g['name'] for g in earlier]})")
  if "lr_from" in source:
    raise ValueError(f"{where}: lr_from {source['name']!r} takes its own learning rates from another group")
  missing = sorted({v["name"] for v in group["variants"]} - {v["name"] for v in source["variants"]})
  if missing:
    raise ValueError(f"{where}: lr_from {source['name']!r} has no variant {missing} to choose a learning rate for")


def base_config(study: dict[str, Any]) -> ml_collections.ConfigDict:
  config = load_module(study["base_config"]).get_config()
  apply_overrides(config, study.get("overrides", {}), "study overrides")
  return config


def train_flops_per_step(config: ml_collections.ConfigDict) -> float:
  t = config.training
  return info.flops_per_token(config)["train"] * t.batch_size * t.grad_accum_steps * config.data.max_length


def expected_seconds(run: "Run", seconds_per_flop: float) -> float:
  """A run's time at a measured seconds per training FLOP; a wall-time run takes its minutes (the clock stops it)."""
  if run.budget["kind"] == "wall_time":
    return 60.0 * float(run.budget["minutes"])
  return seconds_per_flop * train_flops_per_step(run.config) * run.config.training.total_steps


def _variant_config(study: dict[str, Any], group: dict[str, Any], variant: dict[str, Any]) -> ml_collections.ConfigDict:
  config = base_config(study)
  apply_overrides(config, group.get("overrides", {}), f"group {group['name']}")
  apply_overrides(config, variant.get("overrides", {}), f"variant {group['name']}/{variant['name']}")
  return config


def budget_steps(study: dict[str, Any], group: dict[str, Any], config: ml_collections.ConfigDict,
                 budget: dict[str, Any] | None = None) -> int:
  """Optimizer steps that give this variant the budget (default: the group's; the step cap for wall time)."""
  budget = budget or group["budget"]
  if budget["kind"] == "tokens":
    return int(budget["steps"])
  if budget["kind"] == "wall_time":
    return int(budget["max_steps"])
  reference = next(v for v in group["variants"] if v["name"] == budget["reference"])
  total = train_flops_per_step(_variant_config(study, group, reference)) * budget["steps"]
  return max(1, round(total / train_flops_per_step(config)))


def _budgeted_config(study: dict[str, Any], group: dict[str, Any], variant: dict[str, Any],
                     budget: dict[str, Any]) -> ml_collections.ConfigDict:
  config = _variant_config(study, group, variant)
  t = config.training
  t.total_steps = budget_steps(study, group, config, budget)
  t.warmup_steps = min(t.warmup_steps, t.total_steps)
  # About six validation points per run for the curves, and one checkpoint at the end.
  t.eval_steps = max(1, t.total_steps // 6)
  t.save_steps = t.total_steps
  if budget["kind"] == "wall_time":
    t.max_train_minutes = float(budget["minutes"])
  return config


def _seeded(config: ml_collections.ConfigDict, seed: int, lr: float | None, where: str) -> ml_collections.ConfigDict:
  run_config = ml_collections.ConfigDict(config.to_dict())
  run_config.seed = seed
  run_config.data.shuffle_seed = seed
  if lr is not None:
    run_config.training.lr = lr
  try:
    validate(run_config)
  except ConfigError as err:
    raise ConfigError(f"{where}: {err}") from err
  return run_config


def expand(study: dict[str, Any]) -> list[Run]:
  """Every run of the study (tuning runs included) with its validated config, most important first.

  A final run of a variant with an lr grid has lr None and the base config's training.lr until
  resolve_lr gives it the chosen one.
  """
  runs = []
  for group_index, group in enumerate(study["groups"]):
    source = lr_source(study, group)
    grid = lr_grid(study, source)
    tiers = {v["name"]: int(v.get("tier", 1)) for v in source["variants"]}
    for variant_index, variant in enumerate(group["variants"]):
      overrides = dict(group.get("overrides", {})) | dict(variant.get("overrides", {}))
      tier = int(variant.get("tier", 1))
      label = variant.get("label", variant["name"])
      where = f"{group['name']}/{variant['name']}"
      if grid and source is group:
        budget = tune_budget(study, group)
        config = _budgeted_config(study, group, variant, budget)
        if config.data.tune_fraction <= 0:
          raise ConfigError(f"{where}: an lr_grid needs a tuning split: set data.tune_fraction > 0 "
                            "(and a data.data_dir of its own)")
        seed = tune_seed(study, group)
        for lr_index, lr in enumerate(grid):
          runs.append(Run(group["name"], variant["name"], label, seed, tier, overrides,
                          _seeded(config, seed, lr, f"{where}/tune_lr{lr:g}"), budget,
                          (tier, 0, seed, group_index, variant_index, lr_index), "tune", lr, grid))
      config = _budgeted_config(study, group, variant, group["budget"])
      for seed in _seeds(variant):
        run_config = _seeded(config, seed, None, f"{where}/seed{seed}")
        # Never before the tuning it waits for: a later group's tier may be lower than its lr_from's.
        order = (max(tier, tiers[variant["name"]]) if grid else tier, 1, seed, group_index, variant_index, 0)
        runs.append(Run(group["name"], variant["name"], label, seed, tier, overrides, run_config,
                        dict(group["budget"]), order, "final", None if grid else float(run_config.training.lr),
                        grid, source["name"]))
  runs.sort(key=lambda r: r.order)
  return runs


def resolve_lr(run: Run, lr: float) -> Run:
  """The final run with training.lr = lr (validated), as the tuning runs chose it."""
  return dataclasses.replace(run, config=_seeded(run.config, run.seed, float(lr), run.key), lr=float(lr))
