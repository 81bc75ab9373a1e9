"""tools/study.py: seed statistics, budgets, run order, and a smoke study end to end (resumable)."""

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from neon_qtg_jax.config import ConfigError
from neon_qtg_jax.study import spec, stats

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


def _study_file(tmp_path: Path, corpus: Path, steps: int = 4, kind: str = "flops", extra: str = "") -> Path:
  path = tmp_path / "smoke_study.py"
  path.write_text(textwrap.dedent(f"""
      GPT = {{"model.attention": "dot", "model.topofilter": False, "model.w_psi": False,
             "model.amplitude_embedding": False, "training.lambda_topo": 0.0, "training.lambda_geo": 0.0,
             "training.lambda_quantum": 0.0}}

      def get_study():
        return {{
            "name": "smoke", "base_config": "{ROOT / 'configs' / 'neon_qtg_tiny.py'}", "baseline": "gpt",
            "overrides": {{
                "model.vocab_size": 384, "model.embed_dim": 16, "model.num_layers": 1, "model.num_heads": 2,
                "model.max_seq_len": 32, "data.source": "text", "data.paths": "{corpus}",
                "data.text_split": "blank_line", "data.data_dir": "{tmp_path / 'data'}", "data.val_fraction": 0.2,
                "data.max_length": 16, "data.stride": 8, "eval.max_length": 16, "eval.stride": 16,
                "training.batch_size": 4, "training.warmup_steps": 1, "training.max_train_minutes": 0.0,
                "training.sample_steps": 1000, "training.log_steps": 2, "training.eval_batches": 2{extra},
            }},
            "groups": [{{"name": "g", "budget": {{"kind": "{kind}", "steps": {steps}, "reference": "qtg"}},
                        "variants": [{{"name": "qtg", "overrides": {{}}, "seeds": 1, "tier": 1}},
                                     {{"name": "gpt", "overrides": GPT, "seeds": 1, "tier": 1}}]}}],
            "notes": ["smoke"],
        }}
      """))
  return path


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / "corpus.txt"
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


def test_wall_time_and_token_budgets(tmp_path, corpus):
  study = spec.load_study(str(_study_file(tmp_path, corpus, steps=7, kind="tokens")))
  assert {r.config.training.total_steps for r in spec.expand(study)} == {7}
  study["groups"][0]["budget"] = {"kind": "wall_time", "minutes": 1.5, "max_steps": 90}
  for run in spec.expand(study):
    assert run.config.training.total_steps == 90 and run.config.training.max_train_minutes == 1.5


def test_an_unknown_override_is_named(tmp_path, corpus):
  study = spec.load_study(str(_study_file(tmp_path, corpus, extra=', "model.no_such_field": 1')))
  with pytest.raises(ConfigError, match="model.no_such_field"):
    spec.expand(study)


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
  gamma = {r["variant"]: r["gamma"] for r in result["runs"]}
  assert gamma["gpt"] is None and np.asarray(gamma["qtg"]).shape == (1, 2)
  params = {r["variant"]: r["params"] for r in result["runs"]}
  assert params["qtg"] - params["gpt"] == (2 * 16) ** 2 + 2  # W_psi and the two heads' gamma
  qtg_summary = result["groups"][0]["variants"][0]
  assert qtg_summary["verdict"] == "too few seeds for an interval"
  report = publish.read_text()
  assert "| qtg |" in report and "smoke" in report and "too few seeds" in report
  assert (publish.parent / "results" / "g_curves.png").exists()
  assert (out / "tensorboard" / "g" / "qtg").is_dir()
  capsys.readouterr()
  # Resuming runs nothing new and reproduces the same numbers.
  assert study_tool.main([f"--study={study_path}", f"--out={out}"]) == 0
  assert "2 already finished, 0 to run" in capsys.readouterr().out
  again = json.loads((out / "study.json").read_text())
  assert [r["final"] for r in again["runs"]] == [r["final"] for r in result["runs"]]
  # A study file whose budget changed does not silently reuse the old runs.
  changed = _study_file(tmp_path, corpus, steps=5, kind="tokens")
  assert study_tool.main([f"--study={changed}", f"--out={out}", "--report_only"]) == 1
  assert "made by a different study file (steps 3 != 5)" in capsys.readouterr().err
