"""tools/study.py: seed statistics, budgets, run order, and a smoke study end to end (resumable)."""

import json
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from conftest import restored_package_logger
from neon_qtg_jax.config import ConfigError
from neon_qtg_jax.study import provenance, readout, report, runner, spec, stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def test_welch_interval_matches_scipy_on_random_samples():
  rng = np.random.default_rng(0)
  for n_a, n_b in ((3, 3), (2, 5), (4, 3)):
    a, b = rng.normal(1.0, 0.3, n_a), rng.normal(0.8, 0.1, n_b)
    ours = stats.welch_interval(list(a), list(b))
    reference = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert ours["difference"] == pytest.approx(a.mean() - b.mean())
    assert (ours["low"], ours["high"]) == pytest.approx((reference.low, reference.high))


def test_an_interval_that_includes_zero_is_never_a_win():
  overlapping = stats.welch_interval([2.00, 2.05, 1.95], [2.01, 2.06, 1.97])
  assert overlapping["low"] < 0 < overlapping["high"]
  assert stats.verdict(overlapping) == stats.NO_DIFFERENCE
  assert stats.verdict(stats.welch_interval([1.90, 1.91, 1.89], [2.00, 2.01, 1.99])) == "better"
  assert stats.verdict(stats.welch_interval([2.10, 2.11, 2.09], [2.00, 2.01, 1.99])) == "worse"
  assert stats.welch_interval([1.9], [2.0, 2.1]) is None
  assert stats.verdict(None) == "too few seeds for an interval"
  assert stats.mean_std([2.0]) == (2.0, 0.0)


def _study_file(tmp_path: Path, corpus: Path, steps: int = 4, kind: str = "flops", extra: str = "",
                top: str = "", name: str = "smoke_study.py", base: Path = ROOT / "configs" / "neon_qtg_tiny.py",
                groups: str = "") -> Path:
  """A tiny study file: one group `g` of qtg and gpt (or `groups`), study-wide overrides plus `extra`,
  top-level keys `top`."""
  path = tmp_path / name
  groups = groups or f"""[{{"name": "g", "budget": {{"kind": "{kind}", "steps": {steps}, "reference": "qtg"}},
                        "variants": [{{"name": "qtg", "overrides": {{}}, "seeds": 1, "tier": 1}},
                                     {{"name": "gpt", "overrides": GPT, "seeds": 1, "tier": 1}}]}}]"""
  groups = " ".join(groups.split())  # one line: the file text below is dedented
  path.write_text(textwrap.dedent(f"""
      GPT = {{"model.attention": "dot", "model.topofilter": False, "model.w_psi": False,
             "model.amplitude_embedding": False, "training.lambda_topo": 0.0, "training.lambda_geo": 0.0,
             "training.lambda_quantum": 0.0}}

      def get_study():
        return {{
            "name": "smoke", "base_config": "{base}", "baseline": "gpt",{top}
            "overrides": {{
                "model.vocab_size": 384, "model.embed_dim": 16, "model.num_layers": 1, "model.num_heads": 2,
                "model.max_seq_len": 32, "data.source": "text", "data.paths": "{corpus}",
                "data.text_split": "blank_line", "data.data_dir": "{tmp_path / 'data'}", "data.val_fraction": 0.2,
                "data.max_length": 16, "data.stride": 8, "eval.max_length": 16, "eval.stride": 16,
                "training.batch_size": 4, "training.warmup_steps": 1, "training.max_train_minutes": 0.0,
                "training.sample_steps": 1000, "training.log_steps": 2, "training.eval_batches": 2{extra},
            }},
            "groups": {groups},
            "notes": ["smoke"],
        }}
      """))
  return path


@pytest.fixture
def corpus(tmp_path):
  return _write_corpus(tmp_path)


def _write_corpus(directory: Path) -> Path:
  path = directory / "corpus.txt"
  path.write_text("\n\n".join([f"def f{i}(x):\n\treturn x * {i} + {i % 7}" for i in range(60)]
                              + [f"The value {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60)]))
  return path


def test_equal_flops_budget_and_run_order(tmp_path, corpus):
  study = spec.load_study(str(_study_file(tmp_path, corpus, steps=40)))
  runs = spec.expand(study)
  by_variant = {r.variant: r for r in runs}
  budget = spec.train_flops_per_step(by_variant["qtg"].config) * 40
  gpt_steps = by_variant["gpt"].config.training.total_steps
  assert by_variant["qtg"].config.training.total_steps == 40
  # GPT's cheaper steps buy it more of them; the rounding is at most half a step off the budget.
  assert gpt_steps > 40
  assert abs(gpt_steps * spec.train_flops_per_step(by_variant["gpt"].config) - budget) <= \
      0.5 * spec.train_flops_per_step(by_variant["gpt"].config)
  assert [r.variant for r in runs] == ["qtg", "gpt"]


def test_groups_and_variants_select_runs_and_name_unknown_ones(tmp_path, corpus, capsys):
  import study as study_tool  # tools/study.py
  path = _study_file(tmp_path, corpus)
  base = [f"--study={path}", f"--out={tmp_path / 'out'}", "--list"]
  assert study_tool.main(base + ["--variants=gpt"]) == 0
  listing = capsys.readouterr().out
  assert "g/gpt/seed0" in listing and "g/qtg/seed0" not in listing
  assert study_tool.main(base + ["--groups=g", "--variants=qtg,gpt"]) == 0
  listing = capsys.readouterr().out
  assert "g/gpt/seed0" in listing and "g/qtg/seed0" in listing
  assert study_tool.main(base + ["--variants=gpt,nope"]) == 2
  assert "--variants: no variant ['nope']" in capsys.readouterr().err
  assert study_tool.main(base + ["--groups=h"]) == 2
  assert "--groups: no group ['h']" in capsys.readouterr().err


def test_wall_time_and_token_budgets(tmp_path, corpus):
  study = spec.load_study(str(_study_file(tmp_path, corpus, steps=7, kind="tokens")))
  assert {r.config.training.total_steps for r in spec.expand(study)} == {7}
  study["groups"][0]["budget"] = {"kind": "wall_time", "minutes": 1.5, "max_steps": 90}
  for run in spec.expand(study):
    assert run.config.training.total_steps == 90 and run.config.training.max_train_minutes == 1.5
    # Its expected time (the ETA, --list) is its minutes whatever the FLOPs of its step cap.
    assert spec.expected_seconds(run, 1.0) == spec.expected_seconds(run, 0.0) == 90.0
  study["groups"][0]["budget"] = {"kind": "tokens", "steps": 7}
  run = spec.expand(study)[0]
  assert spec.expected_seconds(run, 2e-9) == pytest.approx(2e-9 * 7 * spec.train_flops_per_step(run.config))


def test_an_unknown_override_is_named(tmp_path, corpus):
  study = spec.load_study(str(_study_file(tmp_path, corpus, extra=', "model.no_such_field": 1')))
  with pytest.raises(ConfigError, match="model.no_such_field"):
    spec.expand(study)


def test_lr_grid_expands_to_tuning_runs_first_and_is_checked(tmp_path, corpus):
  top = '\n            "lr_grid": [1e-3, 3e-3], "tune_budget": {"kind": "tokens", "steps": 2},'
  study = spec.load_study(str(_study_file(tmp_path, corpus, steps=5, kind="tokens", top=top,
                                          extra=', "data.tune_fraction": 0.2')))
  runs = spec.expand(study)
  assert [(r.phase, r.variant, r.lr) for r in runs] == [
      ("tune", "qtg", 1e-3), ("tune", "qtg", 3e-3), ("tune", "gpt", 1e-3), ("tune", "gpt", 3e-3),
      ("final", "qtg", None), ("final", "gpt", None)]
  tune = runs[0]
  assert tune.config.training.lr == 1e-3 and tune.config.training.total_steps == 2
  assert tune.seed == spec.DEFAULT_TUNE_SEED == tune.config.data.shuffle_seed and tune.key == "g/qtg/tune_lr0.001"
  final = spec.resolve_lr(runs[4], 3e-3)
  assert final.config.training.lr == 3e-3 and final.config.training.total_steps == 5 and final.seed == 0
  # A grid needs a tuning split; a bad grid or a tuning seed among the seeds is named.
  study_without = spec.load_study(str(_study_file(tmp_path, corpus, top=top, name="no_tune.py")))
  with pytest.raises(ConfigError, match=r"g/qtg: an lr_grid needs a tuning split: set data\.tune_fraction"):
    spec.expand(study_without)
  for bad, message in (('"lr_grid": [1e-3, -1.0],', "lr_grid must be a list of learning rates > 0"),
                       ('"lr_grid": [1e-3], "tune_seed": 0,', "tune_seed 0 is one of variant 'qtg''s seeds"),
                       ('"lr_grid": [1e-3], "tune_budget": {"kind": "tokens"},', "a 'tokens' budget needs 'steps'")):
    with pytest.raises(ValueError, match=message):
      spec.load_study(str(_study_file(tmp_path, corpus, top="\n            " + bad, name="bad.py")))


def _tuning(lr, bits, diverged=False):
  return {"lr": lr, "seed": 100, "budget": {}, "steps": 2, "stopped_by_clock": False,
          "tune": {"bits_per_byte": None, "diverged": True} if diverged else {"bits_per_byte": bits}}


def test_choose_lr_takes_the_lowest_tuning_bits_never_a_diverged_one():
  grid = (1e-3, 3e-3, 1e-2)
  assert runner.choose_lr(grid, [_tuning(1e-3, 2.5), _tuning(3e-3, 2.1), _tuning(1e-2, 2.3)])["chosen"] == 3e-3
  assert runner.choose_lr(grid, [_tuning(1e-3, 2.5), _tuning(3e-3, 2.1), _tuning(1e-2, 0, True)])["chosen"] == 3e-3
  assert runner.choose_lr(grid, [_tuning(1e-3, 2.5), _tuning(1e-2, 2.0)]) is None  # 3e-3 not run yet
  assert runner.choose_lr(grid, [_tuning(lr, 0, True) for lr in grid])["chosen"] is None
  assert runner.choose_lr(grid, [_tuning(1e-3, 2.0), _tuning(3e-3, 2.0), _tuning(1e-2, 2.2)])["chosen"] == 1e-3


# An equal-wall-time group with an lr grid: its tuning runs get the same wall-time budget. The clock
# (0.06 s) stops every run at its first check (the trainer checks every step: step 1) of at most 50 steps.
TUNED_GROUPS = """[{"name": "w", "budget": {"kind": "wall_time", "minutes": 0.001, "max_steps": 50},
                    "variants": [{"name": "gpt", "overrides": GPT, "seeds": 1, "tier": 1}]}]"""
TUNED_TOP = '\n            "lr_grid": [1e-3, 3e-2],'


@pytest.fixture(scope="module")
def tuned_study(tmp_path_factory):
  """A study with an lr grid of 2 values for a wall-time group of gpt: 2 tuning runs and 1 final run, run
  once for the tests below."""
  import study as study_tool  # tools/study.py
  tmp_path = tmp_path_factory.mktemp("tuned")
  corpus = _write_corpus(tmp_path)
  study_path = _study_file(tmp_path, corpus, top=TUNED_TOP, extra=', "data.tune_fraction": 0.2',
                           groups=TUNED_GROUPS)
  out = tmp_path / "out"
  with restored_package_logger():  # it trains in process, before the per-test logger fixture looks
    code = study_tool.main([f"--study={study_path}", f"--out={out}", f"--publish={tmp_path / 'docs' / 'RESULTS.md'}"])
  return tmp_path, corpus, study_path, out, code


def test_lr_grid_picks_the_lowest_tuning_bits_and_reruns_nothing(tuned_study, capsys):
  import study as study_tool  # tools/study.py
  tmp_path, _, study_path, out, code = tuned_study
  assert code == 0
  result = json.loads((out / "study.json").read_text())
  assert result["runs_finished"] == result["runs_planned"] == 3 and not result["failures"]
  assert len(result["tuning_runs"]) == 2 and len(result["runs"]) == 1
  for tuning in result["tuning_runs"]:
    assert tuning["eval_split"] == "tune" and tuning["eval_file"] == "eval/final_tune.json"
    scored = json.loads(Path(tuning["workdir"], tuning["eval_file"]).read_text())
    assert scored["data"].endswith("(tune split)") and scored["bits_per_byte"] == tuning["tune"]["bits_per_byte"]
    assert "final" not in tuning and tuning["config"]["training"]["lr"] == tuning["lr"]
    assert tuning["stopped_by_clock"] and tuning["steps"] == 1 and tuning["planned_steps"] == 50
  for name, choice in result["lr_choices"].items():
    group, variant = name.split("/")
    mine = {t["lr"]: t["tune"]["bits_per_byte"] for t in result["tuning_runs"]
            if (t["group"], t["variant"]) == (group, variant)}
    assert choice["chosen"] == min(mine, key=mine.get) and choice["tune_bits_per_byte"] == [mine[1e-3], mine[3e-2]]
    final = next(r for r in result["runs"] if (r["group"], r["variant"]) == (group, variant))
    assert final["lr"] == final["config"]["training"]["lr"] == choice["chosen"] and final["eval_split"] == "val"
  assert sorted(result["lr_choices"]) == ["w/gpt"]
  # Tuning and final runs train on the train split only; the tune split is disjoint from both.
  with np.load(tmp_path / "data" / "documents.npz") as z:
    is_val, is_tune, hashes = z["is_val"], z["is_tune"], z["hash"]
  assert is_tune.any() and not (is_val & is_tune).any()
  assert not set(hashes[is_tune].tolist()) & set(hashes[~(is_val | is_tune)].tolist())
  # The clock stops the final run too; the report gives the steps reached.
  wall = result["runs"][0]
  assert wall["stopped_by_clock"] and wall["steps"] == 1 and wall["planned_steps"] == 50
  report_text = (tmp_path / "docs" / "RESULTS.md").read_text()
  assert "| variant | lr 0.001 | lr 0.03 | chosen |" in report_text
  assert "tuning split" in report_text and "never scored in the tables of this report" in report_text
  choice = result["lr_choices"]["w/gpt"]
  bold = f"**{choice['tune_bits_per_byte'][[1e-3, 3e-2].index(choice['chosen'])]:.4f} (1 step, stopped by the clock)**"
  assert bold in report_text and f"| {choice['chosen']:g} |" in report_text
  assert "| 1 of 50, 1/1 stopped by the clock |" in report_text
  assert (tmp_path / "docs" / "results" / "w_lr_grid.png").exists()
  # A second call runs nothing and changes nothing.
  capsys.readouterr()
  assert study_tool.main([f"--study={study_path}", f"--out={out}"]) == 0
  assert "3 with a result, 0 to run" in capsys.readouterr().out
  again = json.loads((out / "study.json").read_text())
  assert again["runs"] == result["runs"] and again["tuning_runs"] == result["tuning_runs"]
  # --list: the CPU time from the measured seconds per FLOP of the finished runs.
  assert study_tool.main([f"--study={study_path}", f"--out={out}", "--list"]) == 0
  listing = capsys.readouterr().out
  assert "w/gpt/tune_lr0.001" in listing and "(finished)" in listing
  assert re.search(r"CPU time \(one process.*\): \d+\.\d\d h in all, \d+\.\d\d h done, 0\.00 h left", listing)
  # Before a study has run: measured on another study's runs (a published study.json), same variant name.
  tokens_study = _study_file(tmp_path, tmp_path / "corpus.txt", steps=500, kind="tokens", name="tokens.py")
  assert study_tool.main([f"--study={tokens_study}", f"--out={tmp_path / 'empty'}", "--list",
                          f"--calibrate_from={out / 'study.json'}"]) == 0
  listing = capsys.readouterr().out
  assert re.search(r"g/gpt/seed0 .* 500 steps .* min \(variant\)", listing)
  assert re.search(r"g/qtg/seed0 .* min \(all runs\)", listing)
  assert re.search(r"CPU time \(one process.*study\.json\): \d+\.\d\d h in all, 0\.00 h done", listing)


def test_a_changed_study_override_or_base_config_makes_runs_stale(tuned_study, capsys):
  import study as study_tool  # tools/study.py
  tmp_path, corpus, _, out, _ = tuned_study
  before = sorted(p.stat().st_mtime_ns for p in out.rglob("result.json"))
  changed_override = _study_file(tmp_path, corpus, top=TUNED_TOP, groups=TUNED_GROUPS, name="changed.py",
                                 extra=', "data.tune_fraction": 0.2, "training.weight_decay": 0.1')
  base = tmp_path / "base_config.py"
  base.write_text((ROOT / "configs" / "neon_qtg_tiny.py").read_text()
                  + "\n\n_get = get_config\n\n\ndef get_config():\n  c = _get()\n  c.training.beta2 = 0.99\n"
                  + "  return c\n")
  changed_base = _study_file(tmp_path, corpus, top=TUNED_TOP, groups=TUNED_GROUPS, name="changed_base.py",
                             extra=', "data.tune_fraction": 0.2', base=base)
  for study_path, field in ((changed_override, "training.weight_decay: 0.01 -> 0.1"),
                            (changed_base, "training.beta2: 0.999 -> 0.99")):
    capsys.readouterr()
    assert study_tool.main([f"--study={study_path}", f"--out={out}", "--report_only"]) == 1
    err = capsys.readouterr().err
    result = json.loads((out / "study.json").read_text())
    assert result["runs_finished"] == 0 and len(result["stale"]) == 2  # the tuning runs; the seed waits on them
    assert all(field in line for line in result["stale"]) and "stale: w/gpt/tune_lr0.001" in err
    assert len(result["failures"]) == 1 and "lr tuning did not finish" in result["failures"][0]
    assert "## Stale runs (made under other settings; not reused)" in (out / "report.md").read_text()
  assert sorted(p.stat().st_mtime_ns for p in out.rglob("result.json")) == before  # nothing touched


# The tuned wall-time group `w` and a second group that takes its learning rates from it.
LR_FROM_GROUPS = TUNED_GROUPS[:-1] + """,
                    {"name": "w2", "lr_from": "w", "budget": {"kind": "wall_time", "minutes": 0.001, "max_steps": 50},
                     "overrides": {"training.weight_decay": 0.0},
                     "variants": [{"name": "gpt", "overrides": GPT, "seeds": 1, "tier": 1}]}]"""


def test_a_group_with_lr_from_trains_at_the_rates_chosen_in_its_source_group(tuned_study, tmp_path, capsys):
  import shutil
  import study as study_tool  # tools/study.py
  source_tmp, corpus, _, out, _ = tuned_study
  study_path = _study_file(source_tmp, corpus, top=TUNED_TOP, extra=', "data.tune_fraction": 0.2',
                           groups=LR_FROM_GROUPS, name="lr_from.py")
  runs = spec.expand(spec.load_study(str(study_path)))
  assert [r.key for r in runs if r.group == "w2"] == ["w2/gpt/seed0"]  # no tuning runs of its own
  assert runs[-1].pending_lr and runs[-1].lr_group == "w" and runs[-1].lr_grid == (1e-3, 3e-2)
  # Another process's directory where w's tuning has not run: --groups=w2 reads it and runs nothing.
  empty = tmp_path / "empty"
  assert study_tool.main([f"--study={study_path}", f"--out={empty}", "--groups=w2"]) == 0
  printed = capsys.readouterr().out
  assert "1 runs (0 lr tuning runs), 0 with a result, 1 to run" in printed and "2 tuning runs" in printed
  assert "0/1 runs finished" in printed and not (empty / "tune").exists() and not (empty / "runs").exists()
  # Where w's tuning finished, w2's seed trains at w's chosen rate (the w runs stay untouched).
  copy = tmp_path / "out"
  shutil.copytree(out, copy)
  assert study_tool.main([f"--study={study_path}", f"--out={copy}", "--groups=w2"]) == 0
  assert "1/1 runs finished" in capsys.readouterr().out
  assert study_tool.main([f"--study={study_path}", f"--out={copy}", "--report_only"]) == 0
  result = json.loads((copy / "study.json").read_text())
  chosen = result["lr_choices"]["w/gpt"]["chosen"]
  record = json.loads((copy / "runs" / "w2" / "gpt" / "seed0" / "result.json").read_text())
  assert record["lr"] == record["config"]["training"]["lr"] == chosen and record["lr_group"] == "w"
  assert result["runs_finished"] == 4 and result["groups"][1]["lr_from"] == {"group": "w", "chosen": {"gpt": chosen}}
  assert result["groups"][1]["lr_grid"] is None
  assert f"each variant's as chosen in \"w\" (its grid above), not tuned for this group: `gpt` {chosen:g}." in \
      (copy / "report.md").read_text()


def test_lr_from_must_name_an_earlier_tuned_group_with_the_same_variants(tmp_path, corpus):
  gpt = '{"name": "gpt", "overrides": GPT, "seeds": 1, "tier": 1}'
  qtg = '{"name": "qtg", "overrides": {}, "seeds": 1, "tier": 1}'
  budget = '"budget": {"kind": "tokens", "steps": 2}'

  def groups(second: str, variants: str = gpt) -> str:
    return f'[{{"name": "a", {budget}, "variants": [{gpt}]}}, {{"name": "b", {budget}, {second} "variants": [{variants}]}}]'

  top = '\n            "lr_grid": [1e-3, 3e-3],'
  for second, variants, message in (
      ('"lr_from": "c",', gpt, r"lr_from 'c' is not a group listed before it \(\['a'\]\)"),
      ('"lr_from": "a", "lr_grid": [1e-2],', gpt, "'lr_grid' and 'lr_from' exclude each other"),
      ('"lr_from": "a",', f"{gpt}, {qtg}", r"lr_from 'a' has no variant \['qtg'\]")):
    path = _study_file(tmp_path, corpus, top=top, groups=groups(second, variants), name="bad_lr_from.py",
                       extra=', "data.tune_fraction": 0.2')
    with pytest.raises(ValueError, match=message):
      spec.load_study(str(path))


def test_a_run_another_process_holds_is_skipped_never_run_twice(tuned_study, tmp_path):
  import subprocess
  _, _, study_path, _, _ = tuned_study
  runs = spec.expand(spec.load_study(str(study_path)))
  out = tmp_path / "shared"
  workdirs = [runner.run_workdir(str(out), r) for r in runs if r.phase == "tune"]
  with runner.run_lock(workdirs[0]) as first, runner.run_lock(workdirs[1]) as second:
    assert first and second
    with runner.run_lock(workdirs[0]) as again:  # a second holder, as another process would be
      assert not again
    printed = []
    outcome = runner.run_all(runs, str(out), print_fn=printed.append)
  assert [line.split(":")[0] for line in outcome.pending] == ["w/gpt/tune_lr0.001", "w/gpt/tune_lr0.03", "w/gpt/seed0"]
  assert "being run by another process" in outcome.pending[0] and "waiting for its lr tuning" in outcome.pending[2]
  assert any("being run by another process; skipped" in line for line in printed)
  assert not outcome.failures and not any(p.name == "run.json" for p in out.rglob("*"))  # nothing started
  # A lock dies with its process: a holder killed while holding it frees the run.
  code = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); from neon_qtg_jax.study import runner\n"
          f"with runner.run_lock({workdirs[0]!r}) as held:\n  assert held\n  os._exit(0)")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
  with runner.run_lock(workdirs[0]) as held:
    assert held


def test_a_stop_signal_inside_a_flag_reaches_the_enclosing_one_never_the_default_action():
  import signal
  from neon_qtg_jax.training.preemption import PreemptionFlag
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionFlag() as outer:
    with PreemptionFlag() as inner:
      signal.raise_signal(signal.SIGTERM)
      assert inner.requested and not outer.requested
    assert outer.requested and outer.signal_name == "SIGTERM"
  with PreemptionFlag() as alone:  # the previous handler is the default action: not replayed on exit
    signal.raise_signal(signal.SIGTERM)
  assert alone.requested and signal.getsignal(signal.SIGTERM) == before
  previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with PreemptionFlag() as ctrl_c:  # nor is Python's SIGINT handler: no KeyboardInterrupt after a clean stop
      signal.raise_signal(signal.SIGINT)
    assert ctrl_c.requested and signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous_int)


def test_a_signal_during_a_study_stops_it_and_the_run_resumes_unscored(tuned_study, tmp_path, monkeypatch):
  """A wall-time run stopped by SIGTERM is not scored as if the clock had stopped it; no run starts after."""
  import signal
  from neon_qtg_jax.training import watchdog
  _, _, study_path, _, _ = tuned_study
  runs = spec.expand(spec.load_study(str(study_path)))
  real_observe = watchdog.Beat.observe

  def signalled_observe(self, ctx):  # during the first step: the loop's flag receives it, inside the watchdog
    real_observe(self, ctx)
    signal.raise_signal(signal.SIGTERM)

  monkeypatch.setattr(watchdog.Beat, "observe", signalled_observe)
  out = tmp_path / "out"
  printed = []
  with restored_package_logger():
    outcome = runner.run_all(runs, str(out), print_fn=printed.append)
  first = Path(runner.run_workdir(str(out), runs[0]))
  assert not outcome.failures and not outcome.records and not outcome.tuning
  assert "w/gpt/tune_lr0.001: stopped by a signal at step 1; the next call resumes it" in outcome.pending[0]
  assert "w/gpt/tune_lr0.03: not run: the study was stopped by SIGTERM" in outcome.pending[1]
  assert not (first / runner.RESULT_FILE).exists() and not (first / "eval").exists()
  assert not Path(runner.run_workdir(str(out), runs[1])).exists() and (first / "checkpoints" / "1").is_dir()
  monkeypatch.setattr(watchdog.Beat, "observe", real_observe)
  with restored_package_logger():
    outcome = runner.run_all(runs[:1], str(out), print_fn=printed.append)
  assert len(outcome.tuning) == 1 and not outcome.pending and not outcome.failures
  assert len(runner.attempt_codes(str(first))) == 2  # resumed from step 1 with the minutes left, then scored


def test_wait_passes_again_until_another_process_finishes_its_run(tuned_study, tmp_path, capsys):
  import shutil
  import threading
  import study as study_tool  # tools/study.py
  _, _, study_path, out, _ = tuned_study
  copy = tmp_path / "out"
  shutil.copytree(out, copy)
  final = next(r for r in spec.expand(spec.load_study(str(study_path))) if r.phase == "final")
  workdir = runner.run_workdir(str(copy), final)
  os.rename(workdir, tmp_path / "finished_elsewhere")
  held, finish = threading.Event(), threading.Event()

  def other_process():  # a second worker: holds the run's lock until it has "trained" it
    with runner.run_lock(workdir):
      held.set()
      finish.wait(60)
      os.rename(tmp_path / "finished_elsewhere", workdir)

  thread = threading.Thread(target=other_process)
  thread.start()
  held.wait(60)
  threading.Timer(1.5, finish.set).start()
  code = study_tool.main([f"--study={study_path}", f"--out={copy}", "--wait", "--wait_seconds=0.5"])
  thread.join()
  printed = capsys.readouterr().out
  assert code == 0 and "w/gpt/seed0: being run by another process; skipped" in printed
  assert printed.count("passing again every 0.5 s") == 1 and "study: 3/3 runs finished" in printed
  assert "0 to run" not in printed.split("passing again")[1]  # later passes print no header


def test_code_versions_are_recorded_per_run_and_checked_on_request(tuned_study):
  _, _, study_path, out, _ = tuned_study
  records = [json.loads(p.read_text()) for p in out.rglob("result.json")]
  now = provenance.code_version()
  assert len(records) == 3 and now["commit"] != "unknown"
  for record in records:
    assert record["code"] == now and record["code_attempts"] == [now]
  assert report.code_versions(records) == {"versions": [{"label": provenance.version_label(now),
                                                         "describe": now["describe"], "runs": 3}],
                                           "majority": provenance.version_label(now), "flagged": []}
  runs = spec.expand(spec.load_study(str(study_path)))
  tune = runs[0]
  workdir = runner.run_workdir(str(out), tune)
  other = now | {"commit": "0" * 40}
  assert runner.stale_reason(workdir, tune, other) == ""                 # by default the config decides
  assert "--require_same_code" in runner.stale_reason(workdir, tune, other, require_same_code=True)
  # A run made (partly) by other code than the majority's is flagged in the report.
  records[0]["code_attempts"] = [now, other]
  versions = report.code_versions(records)
  assert versions["flagged"] == [records[0]["key"]] and len(versions["versions"]) == 2


@pytest.mark.parametrize("scale_param", ["softplus", "exp"])
def test_learned_attention_scalars_are_the_models_own_scales(scale_param):
  """gamma and beta per layer and head, however they are stored (softplus or exp, with an lr multiplier)."""
  from flax import nnx
  from neon_qtg_jax.config import default_config
  from neon_qtg_jax.model import QTGModel

  cfg = default_config().model
  cfg.update(vocab_size=31, embed_dim=16, num_layers=2, num_heads=2, max_seq_len=16, sphere_map="normed",
             gamma=6.0, beta=1.5, scale_param=scale_param, scale_lr_mult=3.0)
  scalars = readout.attention_scalars(QTGModel(cfg, rngs=nnx.Rngs(0)))
  assert sorted(scalars) == ["beta", "gamma"]
  assert np.allclose(scalars["gamma"], 6.0, atol=1e-3) and np.allclose(scalars["beta"], 1.5, atol=1e-3)
  assert np.asarray(scalars["gamma"]).shape == (2, 2)


def test_a_retried_run_resumes_and_scores_into_a_fresh_file(tmp_path, corpus, monkeypatch, capsys):
  import study as study_tool  # tools/study.py
  from neon_qtg_jax.evaluation import perplexity
  groups = """[{"name": "g", "budget": {"kind": "tokens", "steps": 2},
                 "variants": [{"name": "gpt", "overrides": GPT, "seeds": 1, "tier": 1}]}]"""
  study_path = _study_file(tmp_path, corpus, groups=groups)
  out = tmp_path / "out"
  workdir = out / "runs" / "g" / "gpt" / "seed0"

  def fail(*args, **kwargs):
    raise RuntimeError("injected")

  # 1: fails after training, before scoring.
  with monkeypatch.context() as m:
    m.setattr(perplexity, "run", fail)
    assert study_tool.main([f"--study={study_path}", f"--out={out}"]) == 1
  assert "g/gpt/seed0: RuntimeError: injected" in capsys.readouterr().err
  assert (workdir / "checkpoints").is_dir() and not (workdir / "result.json").exists()
  # 2: fails after scoring (its eval/final_val.json is written).
  with monkeypatch.context() as m:
    m.setattr(readout, "attention_entropy", fail)
    assert study_tool.main([f"--study={study_path}", f"--out={out}"]) == 1
  first_eval = (workdir / "eval" / "final_val.json").read_text()
  # 3: the retry does not trip over that file, leaves it as it was, and scores into a fresh one.
  assert study_tool.main([f"--study={study_path}", f"--out={out}"]) == 0
  record = json.loads((workdir / "result.json").read_text())
  assert record["eval_file"] == "eval/final_val.2.json" and record["steps"] == 2
  assert (workdir / "eval" / "final_val.json").read_text() == first_eval
  assert json.loads(first_eval)["bits_per_byte"] == record["final"]["bits_per_byte"]  # the same checkpoint
  assert len((workdir / "attempts.jsonl").read_text().splitlines()) == 3
  assert record["attention_entropy"] and len(record["attention_entropy"]) == 1  # one layer of 2 heads
  # A result is never overwritten; a stale run is moved aside on request, never deleted.
  with pytest.raises(FileExistsError):
    runner._write_new_json(str(workdir / "result.json"), {})  # pylint: disable=protected-access
  changed = _study_file(tmp_path, corpus, groups=groups, name="changed.py", extra=', "training.weight_decay": 0.0')
  run = spec.expand(spec.load_study(str(changed)))[0]
  assert "training.weight_decay: 0.01 -> 0.0" in runner.stale_reason(str(workdir), run)
  moved = runner.move_aside(str(workdir))
  assert moved.endswith("seed0.stale1") and Path(moved, "result.json").exists() and not workdir.exists()


def test_a_resumed_wall_time_run_gets_only_the_minutes_left(tmp_path, monkeypatch):
  from neon_qtg_jax.config import default_config
  from neon_qtg_jax.checkpoint import checkpointer as checkpointing
  config = default_config()
  config.training.max_train_minutes = 3.0
  assert runner._training_config(config, str(tmp_path)) is config  # pylint: disable=protected-access
  (tmp_path / "checkpoints").mkdir()
  for used_seconds, left in ((60.0, 2.0), (180.0, None), (200.0, None)):
    monkeypatch.setattr(checkpointing, "load_meta", lambda *a, s=used_seconds: {"train_seconds": s, "step": 7})
    resumed = runner._training_config(config, str(tmp_path))  # pylint: disable=protected-access
    assert (resumed is None) if left is None else resumed.training.max_train_minutes == pytest.approx(left)
  assert config.training.max_train_minutes == 3.0  # the run's own config (and identity) is unchanged
  config.training.max_train_minutes = 0.0  # no wall-time budget: trained as configured
  assert runner._training_config(config, str(tmp_path)) is config  # pylint: disable=protected-access


def _recall_result(directory: Path, name: str, **fields) -> None:
  result = {"variant": "gpt", "task": "mqar", "preset": "small", "seed": 0, "accuracy": 1.0, "chance": 0.25,
            "steps": 1000, "seconds": 60.0, "attention_entropy": [0.8, 0.3]} | fields
  (directory / name).write_text(json.dumps(result))


def test_report_renders_the_recall_table_first(tmp_path, corpus, capsys):
  import study as study_tool  # tools/study.py
  recall = tmp_path / "recall"
  (recall / "sweep").mkdir(parents=True)
  _recall_result(recall, "gpt0.json")
  _recall_result(recall, "gpt1.json", seed=1, accuracy=0.9, steps=1200, attention_entropy=[0.6, 0.5])
  _recall_result(recall, "qtg0.json", variant="qtg", accuracy=0.97, attention_entropy=[[0.2, 0.4], [0.9, 0.9]])
  _recall_result(recall / "sweep", "qtg_seed0.json", variant="qtg_seed", task="lookup", preset="hard",
                 accuracy=0.31, chance=0.125)
  study_path = _study_file(tmp_path, corpus, top=f'\n            "recall_dir": "{recall}", "headline": "qtg",')
  publish = tmp_path / "RESULTS.md"
  # Report only: nothing runs, the recall table comes from the study file's recall_dir.
  assert study_tool.main([f"--study={study_path}", f"--out={tmp_path / 'out'}", "--report_only",
                          f"--publish={publish}"]) == 0
  text = publish.read_text()
  assert text.index("## Associative recall") < text.index("## Main result") < text.index("## g")
  assert "| lookup | hard | `qtg_seed` | 1 | 0.310 | 0/1 | 0.125 | 1000 | 60 | L0 0.80, L1 0.30 |" in text
  assert "| mqar | small | `gpt` | 2 | 0.950 ± 0.071 (1.000, 0.900) | 1/2 | 0.250 | 1100 | 60 | L0 0.70, L1 0.40 |" in text
  assert "| mqar | small | `qtg` | 1 | 0.970 | 1/1 | 0.250 | 1000 | 60 | L0 0.30, L1 0.90 |" in text
  assert "## Not run yet" in text and "INCOMPLETE: 0 of 2 runs finished" in text
  # A result without a field stops the tool before any run, naming the file and the field.
  _recall_result(recall, "broken.json")
  broken = json.loads((recall / "broken.json").read_text())
  del broken["chance"]
  (recall / "broken.json").write_text(json.dumps(broken))
  capsys.readouterr()
  assert study_tool.main([f"--study={study_path}", f"--out={tmp_path / 'out'}", f"--recall_dir={recall}"]) == 2
  assert re.search(r"broken\.json: not a tools/recall\.py result: no field 'chance'", capsys.readouterr().err)
  assert not (tmp_path / "out" / "runs").exists()


def test_report_says_worse_plainly():
  group = {"variants": [{"name": "gpt", "label": "GPT", "seeds_done": 3},
                        {"name": "qtg", "label": "QTG", "seeds_done": 3, "verdict": "worse",
                         "vs_baseline_bits_per_byte": {"difference": 0.05, "low": 0.02, "high": 0.08}}]}
  assert report._findings(group, "gpt") == [  # pylint: disable=protected-access
      "- QTG: WORSE than `gpt`: bits/byte higher by 0.0500 (95% CI +0.0500 [+0.0200, +0.0800]; 3 seeds against 3)."]
  def record(variant, seed, bits):
    return {"variant": variant, "seed": seed, "final": {"bits_per_byte": bits}}
  in_group = [record("gpt", s, b) for s, b in enumerate((2.00, 2.01, 1.99))]
  in_group += [record("qtg", s, b) for s, b in enumerate((2.10, 2.12, 2.11))]
  in_group += [record("dot", s, b) for s, b in enumerate((2.11, 2.09, 2.12))]
  study_json = {"groups": [
      {"title": "A", "comparisons": [report._comparison(in_group, "qtg", "gpt"),  # pylint: disable=protected-access
                                     report._comparison(in_group, "qtg", "dot")]},  # pylint: disable=protected-access
      {"title": "B", "comparisons": [report._comparison([], "qtg", "gpt")]}]}  # pylint: disable=protected-access
  lines = report.comparison_table(study_json, "qtg", "gpt")
  assert lines[0].startswith("Of 1 group(s) with both run, `qtg` is worse than `gpt` in 1, better in 0")
  assert "| A | 2.0000 ± 0.0100 | 2.1100 ± 0.0100 | +0.1100 [" in lines[-2] and "| `qtg` worse than `gpt` |" in lines[-2]
  assert "| B | | | | not run yet | |" == lines[-1]
  # A contrast is read the same way: here no measurable difference, and a group without it has no row.
  lines = report.comparison_table(study_json, "qtg", "dot")
  assert "not measurably different in 1" in lines[0] and "| no measurable difference | 3 + 3 |" in lines[-1]
  assert len(lines) == 5


def test_contrasts_must_name_two_variants_some_group_runs_together(tmp_path, corpus):
  for top, message in (('\n            "contrasts": [("qtg", "qtg")],', "a pair of two different variant names"),
                       ('\n            "contrasts": [("qtg", "mamba")],', "no group runs both 'qtg' and 'mamba'"),
                       ('\n            "headline": "mamba",', "no group runs both 'mamba' and 'gpt'")):
    with pytest.raises(ValueError, match=message):
      spec.load_study(str(_study_file(tmp_path, corpus, top=top)))
  study = spec.load_study(str(_study_file(tmp_path, corpus, top='\n            "headline": "qtg", '
                                                                   '"contrasts": [["gpt", "qtg"]],')))
  assert spec.comparisons(study) == [("qtg", "gpt"), ("gpt", "qtg")]


def test_an_unmeasured_attention_entropy_is_said_not_hidden():
  records = [{"attention_entropy": None, "attention_entropy_error": "layer 0: analysis.attention_probs does not "
              "reproduce the model's attention output", "workdir": "/nonexistent"}]
  entropy = report._entropy_per_layer(records)  # pylint: disable=protected-access
  group = {"variants": [{"label": "QTG", "attention_entropy_per_layer": entropy,
                         "attention_entropy_errors": [records[0]["attention_entropy_error"]]}]}
  lines = report._per_layer_lines(group)  # pylint: disable=protected-access
  assert "- QTG: not measured: layer 0: analysis.attention_probs does not reproduce the model's attention output" \
      in lines


def test_smoke_study_end_to_end_and_resumable(tmp_path, corpus, capsys):
  import study as study_tool  # tools/study.py
  study_path = _study_file(tmp_path, corpus, steps=3, kind="tokens")
  out = tmp_path / "out"
  publish = tmp_path / "docs" / "RESULTS.md"
  assert study_tool.main([f"--study={study_path}", f"--out={out}", f"--publish={publish}"]) == 0
  result = json.loads((out / "study.json").read_text())
  assert result["runs_finished"] == result["runs_planned"] == 2
  for run in result["runs"]:
    assert run["steps"] == 3 and run["tokens"] == 3 * 4 * 16
    assert run["final"]["bits_per_byte"] > 0 and run["final"]["checkpoint_step"] == 3
    assert run["curve"] and run["best_val_ce"] is not None
    assert run["config"]["training"]["total_steps"] == 3 and run["eval_file"] == "eval/final_val.json"
  scalars = {r["variant"]: r["attention_scalars"] for r in result["runs"]}
  assert scalars["gpt"] == {} and np.asarray(scalars["qtg"]["gamma"]).shape == (1, 2)
  params = {r["variant"]: r["params"] for r in result["runs"]}
  assert params["qtg"] - params["gpt"] == (2 * 16) ** 2 + 2 + 2  # W_psi, the two heads' gamma and beta (normed map)
  qtg_summary = result["groups"][0]["variants"][0]
  assert qtg_summary["verdict"] == "too few seeds for an interval"
  report_text = publish.read_text()
  assert "| qtg |" in report_text and "smoke" in report_text and "too few seeds" in report_text
  assert "`gamma`: L0:" in report_text and "## Code versions" in report_text
  assert (publish.parent / "results" / "g_curves.png").exists()
  assert (out / "tensorboard" / "g" / "qtg").is_dir()
  assert re.search(r"\[1/2\] g/qtg/seed0: 3 steps, val bits/byte [\d.]+, \S+ \| 1 left, ETA \S+ for one process",
                   capsys.readouterr().out)
  # Resuming runs nothing new and reproduces the same numbers.
  assert study_tool.main([f"--study={study_path}", f"--out={out}"]) == 0
  assert "2 with a result, 0 to run" in capsys.readouterr().out
  again = json.loads((out / "study.json").read_text())
  assert [r["final"] for r in again["runs"]] == [r["final"] for r in result["runs"]]
  # A study file whose budget changed does not silently reuse the old runs.
  changed = _study_file(tmp_path, corpus, steps=5, kind="tokens")
  assert study_tool.main([f"--study={changed}", f"--out={out}", "--report_only"]) == 1
  assert "made with another config (training.eval_steps: 1 -> 1" not in capsys.readouterr().err
  assert any("training.total_steps: 3 -> 5" in line for line in json.loads((out / "study.json").read_text())["stale"])


def test_the_qtg_vs_gpt_study_is_the_one_issues_16_and_27_ask_for():
  """studies/qtg_vs_gpt.py: the four variants of issue 16 and the geometry's controls of issue 27 (qtg_cosine,
  qtg_dot), 3 seeds, one lr grid for all, at least 1,000 steps per tiny run, both corpora and a wall-time group
  with gpt_spec; the decision rule is stated and the recall results are committed."""
  study = spec.load_study(str(ROOT / "studies" / "qtg_vs_gpt.py"))
  runs = spec.expand(study)
  finals = [r for r in runs if r.phase != "tune"]
  arms = {"gpt", "gpt_spec", "qtg", "qtg_seed", "qtg_cosine", "qtg_dot"}
  assert {r.variant for r in finals} == arms
  assert {r.group for r in finals} == {"tiny_stdlib", "tiny_fortunes", "tiny_stdlib_wall"}
  for group in ("tiny_stdlib", "tiny_fortunes"):
    for variant in arms:
      mine = [r for r in finals if (r.group, r.variant) == (group, variant)]
      assert sorted(r.seed for r in mine) == [0, 1, 2]
      assert all(r.config.training.total_steps >= 1000 for r in mine)
  assert {r.variant for r in finals if r.group == "tiny_stdlib_wall"} == {"gpt", "gpt_spec", "qtg", "qtg_seed"}
  assert {r.config.model.attention for r in finals if r.variant == "qtg_cosine"} == {"cosine"}
  tuning = [r for r in runs if r.phase == "tune"]
  assert {r.config.training.lr for r in tuning} == set(study["lr_grid"]) and len(study["lr_grid"]) >= 3
  assert all(r.config.data.tune_fraction > 0 and r.group == "tiny_stdlib" for r in tuning)
  assert all(r.pending_lr and r.lr_group == "tiny_stdlib" for r in finals)  # each variant's rate, tuned once
  assert (ROOT / study["recall_dir"]).is_dir()
  # First the contrast that isolates the geometry (the same block, the score to second order), then the others.
  assert spec.comparisons(study) == [("qtg", "gpt"), ("qtg", "qtg_cosine"), ("qtg", "gpt_spec"), ("qtg", "qtg_dot"),
                                     ("qtg_seed", "qtg")]
  rule = study["decision_rule"]
  assert rule["arms"] == ("qtg", "qtg_cosine") and set(rule["language_groups"]) <= {g["name"] for g in study["groups"]}


def test_the_geometry_verdict_follows_the_rule():
  from neon_qtg_jax.evaluation import recall_sweep
  from neon_qtg_jax.study.report import geometry_verdict

  def row(largest, at_least=0):
    return {"largest_solved": largest, "solved_at_least": at_least if largest is None else largest}
  summary = {(arm, w): row(level) for w in (64, 128)
             for arm, level in (("qtg", 16), ("qtg_cosine", 8), ("gpt_spec", 32))}
  assert recall_sweep.recall_reading(summary) == "better"
  summary[("gpt_spec", 64)] = row(8)  # the gate caps width 64 at 8 pairs: no difference there
  assert recall_sweep.recall_reading(summary) == "no difference"
  summary[("qtg_cosine", 128)] = row(None)
  assert recall_sweep.recall_reading(summary) is None
  # Incomplete readouts are lower bounds: qtg failed 4 pairs (final), its twin and the gate solved it and go on.
  summary = {(arm, w): row(None, 4) for w in (64, 128) for arm in ("qtg_cosine", "gpt_spec")}
  summary |= {("qtg", w): row(0) for w in (64, 128)}
  assert recall_sweep.recall_reading(summary) == "worse"
  summary[("qtg_cosine", 128)] = row(0)  # the twin fails 4 pairs at width 128 too: equal there
  assert recall_sweep.recall_reading(summary) == "no difference"
  summary[("qtg_cosine", 128)] = row(None, 0)  # not known yet at 128: open
  assert recall_sweep.recall_reading(summary) is None
  summary[("gpt_spec", 128)] = row(0)  # the gate fails 4 pairs at 128: nothing there counts, whatever runs next
  summary[("qtg", 128)] = row(None, 0)
  assert recall_sweep.recall_reading(summary) == "no difference"  # behind at 64 only: 1 of the 2 widths
  assert "adds value" in geometry_verdict("better", None, "qtg", "qtg_cosine")
  assert "costs value" in geometry_verdict("no difference", "worse", "qtg", "qtg_cosine")
  assert "not decided yet: the language runs" in geometry_verdict("no difference", None, "qtg", "qtg_cosine")
  assert "adds nothing measurable" in geometry_verdict("no difference", "no difference", "qtg", "qtg_cosine")


def test_the_recall_settings_list_every_gate_seed_and_each_arms_chosen_rate(tmp_path):
  from neon_qtg_jax.study.report import recall_settings
  (tmp_path / "gate").mkdir()
  (tmp_path / "tune").mkdir()
  for seed, acc in ((0, 1.0), (1, 0.9876)):
    (tmp_path / "gate" / f"s{seed}.json").write_text(json.dumps({
        "seed": seed, "accuracy": acc, "no_recall_floor": 0.25, "steps": 2000, "seconds": 50.0, "num_pairs": 4,
        "seq_len": 33, "task_spec": {"vocab_size": 256}, "width": 64, "model": {"num_heads": 1}, "lr": 0.001,
        "batch_size": 64, "max_steps": 4000}))
  (tmp_path / "tune" / "qtg.json").write_text(json.dumps({
      "variant": "qtg", "preset": "small", "chosen_lr": 0.003,
      "runs": [{"lr": 0.001, "tune_accuracy": 0.5, "steps_to_solved": None},
               {"lr": 0.003, "tune_accuracy": 1.0, "steps_to_solved": 1500}]}))
  text = "\n".join(recall_settings(str(tmp_path / "gate"), str(tmp_path / "tune")))
  assert "4 pairs in rows of 32 tokens, vocabulary 256, width 64 with 1 head(s)" in text
  assert "| 0 | 1.0000 | 0.250 | 2000 | 50 |" in text and "| 1 | 0.9876 |" in text  # a failing seed is shown too
  assert "| `qtg` | small | 0.003 | 0.001: 0.500 (-), 0.003: 1.000 (1500) |" in text
  assert recall_settings(None, None) == []


def test_the_prose_corpus_is_the_fortunes_packages_plain_files_whatever_else_is_installed(tmp_path, monkeypatch):
  """Other fortune packages add directories (fortunes-ru: ru/) and symlinks; the study's corpus takes neither,
  so its runs read the same documents on every machine."""
  qtg_vs_gpt = spec.load_module(str(Path(__file__).resolve().parents[1] / "studies" / "qtg_vs_gpt.py"))
  for name in ("art", "art.dat", "art.u8", "computers", "wisdom"):
    (tmp_path / name).write_text("%\n")
  (tmp_path / "ru").mkdir()
  (tmp_path / "ru" / "anekdoty").write_text("%\n")
  (tmp_path / "off").symlink_to(tmp_path / "wisdom")
  monkeypatch.setattr(qtg_vs_gpt, "FORTUNE_DIR", str(tmp_path))
  assert qtg_vs_gpt.fortune_files() == f"{tmp_path}/art,{tmp_path}/wisdom"


def test_a_study_continues_from_its_published_record_without_its_run_directories(tuned_study, tmp_path, capsys):
  """--reuse_published: a run without a workdir takes its published record when the config is the run's (a field
  the record lacks counts as equal at its default) and the record's data is the data prepared here; a record made
  with another config or on other data is run again; one without a data fingerprint is reused and listed."""
  import study as study_tool  # tools/study.py
  _, _, study_path, out, _ = tuned_study
  results = [json.loads(p.read_text()) for p in sorted(out.rglob(runner.RESULT_FILE))]
  published = {"runs": [r for r in results if r["phase"] == "final"],
               "tuning_runs": [r for r in results if r["phase"] == "tune"]}
  assert len(published["tuning_runs"]) == 2 and len(published["runs"]) == 1
  del published["tuning_runs"][0]["config"]["model"]["topo_apply"]     # added since, at its default: reused
  published["tuning_runs"][1]["config"]["model"]["topo_apply"] = "scores"  # another config: not reused
  path = tmp_path / "published.json"
  path.write_text(json.dumps(published))
  study = spec.load_study(str(study_path))
  runs = spec.expand(study)
  outcome = runner.run_all(runs, str(tmp_path / "fresh"), execute=False,
                           published=runner.Published.load(str(path), spec.base_config(study)))
  assert [r["key"] for r in outcome.tuning] == [published["tuning_runs"][0]["key"]]
  assert outcome.tuning[0]["published_in"] == str(path) and outcome.ran == 0
  second = published["tuning_runs"][1]["key"]
  assert "not run yet" in next(p for p in outcome.pending if p.startswith(second))
  assert "model.topo_apply: 'scores' -> 'inputs'" in capsys.readouterr().out and not outcome.unchecked
  results = [json.loads(p.read_text()) for p in sorted(out.rglob(runner.RESULT_FILE))]  # unedited
  tuning = [r for r in results if r["phase"] == "tune"]
  prepared = tuning[1]["data"]
  assert prepared == runner.prepared_fingerprint(tuning[1]["config"]["data"]["data_dir"])
  tuning[1]["data"] = prepared | {"tokens": prepared["tokens"] | {"val": prepared["tokens"]["val"] + 1}}
  path.write_text(json.dumps({"runs": [], "tuning_runs": tuning}))  # the same config on other data: not reused
  outcome = runner.run_all(runs, str(tmp_path / "fresh"), execute=False,
                           published=runner.Published.load(str(path), spec.base_config(study)))
  assert [r["key"] for r in outcome.tuning] == [tuning[0]["key"]]
  printed = capsys.readouterr().out
  assert f"[{tuning[1]['key']}] not reused: the record in {path} was trained on other data" in printed
  assert f"tokens.val: {prepared['tokens']['val'] + 1} -> {prepared['tokens']['val']}" in printed
  unprepared = runner.Published.load(str(path), spec.base_config(study))
  unprepared.prepared[prepared_dir := tuning[0]["config"]["data"]["data_dir"]] = None  # a machine without it
  record, why = unprepared.record(next(r for r in runs if r.key == tuning[0]["key"]))
  assert why == "" and record["data_unchecked"].startswith(f"{prepared_dir} is not prepared here")
  path.write_text(json.dumps({"runs": [], "tuning_runs": [record]}))  # published again, then checked where prepared
  record, why = runner.Published.load(str(path), spec.base_config(study)).record(
      next(r for r in runs if r.key == tuning[0]["key"]))
  assert why == "" and "data_unchecked" not in record
  whole = tmp_path / "whole.json"
  results = [json.loads(p.read_text()) for p in sorted(out.rglob(runner.RESULT_FILE))]  # unedited
  finals = [r for r in results if r["phase"] == "final"]
  del finals[0]["data"]  # a record made before records had a data fingerprint: reused, listed as unchecked
  whole.write_text(json.dumps({"runs": finals, "tuning_runs": [r for r in results if r["phase"] == "tune"]}))
  with restored_package_logger():  # the whole published record: nothing runs, the report is written again
    code = study_tool.main([f"--study={study_path}", f"--out={tmp_path / 'again'}", f"--reuse_published={whole}"])
  again = json.loads((tmp_path / "again" / "study.json").read_text())
  assert code == 0 and again["runs_finished"] == 3 and not list((tmp_path / "again").rglob(runner.SPEC_FILE))
  assert [r["final"] for r in again["runs"]] == [r["final"] for r in published["runs"]]
  assert again["unchecked"] == [f"{finals[0]['key']}: the record has no data fingerprint (made before records had "
                                "one): its data is not compared"]
  report_text = (tmp_path / "again" / "report.md").read_text()
  assert "## Published records reused without a data check (1)" in report_text
  assert "1 published record(s) reused without comparing their data" in capsys.readouterr().err


def test_an_unreadable_published_record_is_named_before_any_run(tmp_path, corpus, capsys):
  import study as study_tool  # tools/study.py
  study_path = _study_file(tmp_path, corpus)
  (tmp_path / "bad.json").write_text('{"runs": []')
  for path in (tmp_path / "absent.json", tmp_path / "bad.json"):
    code = study_tool.main([f"--study={study_path}", f"--out={tmp_path / 'out'}", f"--reuse_published={path}"])
    assert code == 2 and f"--reuse_published={path}: not a readable published study.json" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_the_recall_half_says_whether_the_sweep_is_complete(tmp_path):
  """The published sweep has every cell its readout can use: the section says so; without one needed cell it
  reads "from the cells run so far"."""
  import shutil  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.study.report import geometry_section
  study = spec.load_study(str(ROOT / "studies" / "qtg_vs_gpt.py"))
  sweep = tmp_path / "sweep"
  shutil.copytree(ROOT / "docs" / "results" / "recall_sweep", sweep, ignore=shutil.ignore_patterns("tensorboard"))
  study_json = {"study": {"decision_rule": study["decision_rule"], "recall_sweep_dir": str(sweep)}, "groups": []}
  assert "**The rule's recall half** (part a, the sweep complete): no difference." in geometry_section(study_json)
  (sweep / "gpt_spec_pairs8_w128_seed2.json").unlink()
  assert "**The rule's recall half** (part a, from the cells run so far): no difference." in \
      geometry_section(study_json)
