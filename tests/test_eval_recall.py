"""Associative recall tasks (neon_qtg_jax.evaluation.recall, tools/recall.py): what the generated rows hold
and what a run records. Training to the presets' accuracy takes minutes; docs/RESULTS.md has those runs."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from neon_qtg_jax.evaluation import recall

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def _spec(task: str, preset: str = "small") -> recall.TaskSpec:
  return recall.PRESETS[task][preset].spec


def test_mqar_rows_are_zoologys_disjoint_vocabularies_distinct_values_every_key_queried_once():
  spec = _spec("mqar")
  assert spec.vocab_size >= 256
  rows = recall.make_rows(spec, seed=3, rows=200)
  n, half = spec.num_pairs, spec.vocab_size // 2
  assert rows["inputs"].shape == (200, spec.length) and rows["mask"].sum(axis=1).tolist() == [n] * 200
  gaps = []
  for inputs, targets, mask in zip(rows["inputs"], rows["targets"], rows["mask"]):
    keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
    assert len(set(keys.tolist())) == n and ((keys >= 1) & (keys < half)).all()
    assert len(set(values.tolist())) == n and ((values >= half) & (values < spec.vocab_size)).all()
    pairs = dict(zip(keys.tolist(), values.tolist()))
    queried = [int(inputs[position]) for position in np.flatnonzero(mask)]
    assert sorted(queried) == sorted(pairs)  # every key queried once, after the pairs
    for position in np.flatnonzero(mask):
      assert position >= 2 * n and targets[position] == pairs[int(inputs[position])]
      gaps.append((position - 2 * n) // 2)
  assert np.median(gaps) < np.mean(gaps)  # a power law: most queries soon after the pairs, a long tail


def test_lookup_rows_hold_one_pair_per_key_distinct_values_and_never_show_an_answer():
  spec = _spec("lookup")
  rows = recall.make_rows(spec, seed=1, rows=100)
  pair_base = 1 + spec.num_keys + spec.num_values
  for inputs, targets, mask in zip(rows["inputs"], rows["targets"], rows["mask"]):
    pairs = inputs[:spec.num_pairs] - pair_base
    stored = dict(zip((pairs // spec.num_values).tolist(), (pairs % spec.num_values).tolist()))
    assert len(stored) == spec.num_pairs and len(set(stored.values())) == spec.num_pairs
    assert (inputs[spec.num_pairs + 1::2] == 0).all()  # a blank after each query: no answer to eliminate
    for position in np.flatnonzero(mask):
      key = inputs[position] - 1
      assert targets[position] - (1 + spec.num_keys) == stored[key]


def _recall_free_strategies(spec: recall.TaskSpec, rows: dict) -> dict[str, float]:
  """Accuracies of predictors that use no key matching: positions and token kinds only."""
  inputs, targets, mask = rows["inputs"], rows["targets"], rows["mask"]
  rng = np.random.default_rng(0)
  hits = {"first pair": 0, "last pair": 0, "random pair": 0, "latest value-like token": 0}
  pair_values = inputs[:, 1:2 * spec.num_pairs:2]
  for row, position in zip(*np.nonzero(mask)):
    target = targets[row, position]
    hits["first pair"] += pair_values[row, 0] == target
    hits["last pair"] += pair_values[row, -1] == target
    hits["random pair"] += pair_values[row, rng.integers(spec.num_pairs)] == target
    value_like = inputs[row, :position + 1][inputs[row, :position + 1] >= spec.vocab_size // 2]
    hits["latest value-like token"] += value_like.size > 0 and value_like[-1] == target
  return {name: count / mask.sum() for name, count in hits.items()}


def test_no_recall_floor_is_what_recall_free_predictors_reach_and_key_matching_beats_it():
  spec = _spec("mqar", "pairs8")
  rows = recall.make_rows(spec, seed=4, rows=1024)
  floor = recall.no_recall_predictions(spec, rows)
  assert floor == pytest.approx(1 / spec.num_pairs)  # distinct values: nothing to count, the chance level
  se = np.sqrt(floor * (1 - floor) / rows["mask"].sum())
  for name, acc in _recall_free_strategies(spec, rows).items():
    assert acc <= floor + 4 * se, (name, acc, floor)
  # The key-matching oracle: the value that follows the query's key in the pairs.
  oracle = 0
  for row, position in zip(*np.nonzero(rows["mask"])):
    keys = rows["inputs"][row, 0:2 * spec.num_pairs:2]
    index = int(np.flatnonzero(keys == rows["inputs"][row, position])[0])
    oracle += rows["inputs"][row, 2 * index + 1] == rows["targets"][row, position]
  assert oracle == rows["mask"].sum()


def test_the_floor_counts_repeated_values_when_a_row_has_them():
  # Values drawn with replacement (the old MQAR): the most frequent value scores above chance, and the floor says so.
  spec = _spec("mqar")
  rows = recall.make_rows(spec, seed=5, rows=512)
  n = spec.num_pairs
  rng = np.random.default_rng(1)
  repeated = rng.integers(spec.vocab_size // 2, spec.vocab_size // 2 + 3, (512, n))  # 3 values for 4 keys
  lookup = {}
  for row in range(512):
    keys = rows["inputs"][row, 0:2 * n:2]
    lookup[row] = dict(zip(keys.tolist(), repeated[row].tolist()))
    rows["inputs"][row, 1:2 * n:2] = repeated[row]
    for position in np.flatnonzero(rows["mask"][row]):
      rows["targets"][row, position] = lookup[row][int(rows["inputs"][row, position])]
  floor = recall.no_recall_predictions(spec, rows)
  assert floor > 1.2 / n


def test_lookup_floor_is_chance_and_induction_heads_bound_the_induction_task():
  spec = _spec("lookup")
  rows = recall.make_rows(spec, seed=6, rows=512)
  assert recall.no_recall_predictions(spec, rows) == pytest.approx(spec.chance)
  spec = _spec("induction")
  rows = recall.make_rows(spec, seed=6, rows=512)
  floors = recall.floors(spec, rows)
  assert floors["no_recall_floor"] < 0.1 < floors["induction_head_1"] < floors["induction_head_2"] <= 1.0
  record = dict(floors, accuracy=floors["induction_head_2"])
  assert recall.solved_bar(record) == min(recall.SOLVED, floors["induction_head_2"])


def test_induction_repeats_the_segment_at_an_offset_that_varies():
  spec = _spec("induction")
  rows = recall.make_rows(spec, seed=2, rows=300)
  m = spec.segment_len
  second = m + spec.max_filler
  sequences = np.concatenate([rows["inputs"], rows["targets"][:, -1:]], axis=1)
  offsets = set()
  for sequence, mask in zip(sequences, rows["mask"]):
    segment = sequence[second:second + m]
    starts = [s for s in range(0, spec.max_filler + 1) if (sequence[s:s + m] == segment).all()]
    assert starts, "the segment appears before its repeat"
    offsets.add(second - starts[0])
    assert mask.sum() == m - 1 and (np.flatnonzero(mask) + 1 == np.arange(second + 1, second + m)).all()
  assert len(offsets) > spec.max_filler // 2  # position alone cannot find the first copy


def test_rows_are_a_function_of_the_seed_and_tuning_and_held_out_rows_differ():
  spec = _spec("mqar")
  a, b = recall.make_rows(spec, 5, 64), recall.make_rows(spec, 5, 64)
  assert all((a[k] == b[k]).all() for k in a)
  held_out = recall.make_rows(spec, 5 + recall.HELD_OUT_STREAM, 64)
  tuning = recall.make_rows(spec, 5 + recall.TUNE_STREAM, 64)
  assert not (held_out["inputs"] == a["inputs"]).all(axis=1).any()
  assert not (held_out["inputs"] == tuning["inputs"]).all(axis=1).any()


@pytest.mark.parametrize("variant", ["qtg", pytest.param("qtg_cosine", marks=pytest.mark.slow), "gpt_spec"])
def test_tool_writes_the_record_with_floor_and_entropy_per_layer(tmp_path, variant, capsys):
  import recall as recall_tool  # tools/recall.py
  output = tmp_path / "r.json"
  assert recall_tool.main([f"--variant={variant}", "--task=mqar", "--preset=small", "--seed=0", "--steps=6",
                           f"--output={output}"]) == 0
  record = json.loads(output.read_text())
  preset = recall.PRESETS["mqar"]["small"]
  assert record["steps"] == 6 and record["chance"] == 1 / preset.spec.num_pairs
  assert record["no_recall_floor"] == pytest.approx(record["chance"])
  assert 0.0 <= record["accuracy"] <= 1.0 and record["seconds"] > 0 and record["solved"] is False
  assert len(record["attention_entropy"]) == preset.num_layers
  assert all(0.0 < e <= 1.0 + 1e-6 for e in record["attention_entropy"])
  assert record["overrides"] == dict(recall.VARIANTS[variant])
  assert "no-recall floor" in capsys.readouterr().out


def test_tune_reads_tuning_rows_only_and_the_sweep_resumes_and_reports(tmp_path, monkeypatch):
  import recall as recall_tool  # tools/recall.py
  made = []
  make_rows = recall.make_rows
  monkeypatch.setattr(recall, "make_rows", lambda spec, seed, rows: made.append(seed) or make_rows(spec, seed, rows))
  assert recall_tool.main(["--variant=gpt_spec", "--task=mqar", "--preset=small", "--seed=2", "--tune",
                           "--grid=1e-3", "--steps=4", f"--output={tmp_path / 't.json'}"]) == 0
  tuned = json.loads((tmp_path / "t.json").read_text())
  assert tuned["chosen_lr"] == 1e-3 and [r["lr"] for r in tuned["runs"]] == [1e-3]
  assert set(made) == {2 + recall.TUNE_STREAM}  # the held-out stream was never generated
  monkeypatch.setattr(recall, "make_rows", make_rows)
  sweep = ["--sweep", f"--out={tmp_path / 'sweep'}", "--arms=gpt_spec", "--pairs=4", "--widths=64", "--seeds=0",
           "--steps=4"]
  assert recall_tool.main(sweep) == 0
  result = tmp_path / "sweep" / "gpt_spec_pairs4_w64_seed0.json"
  first = result.stat().st_mtime_ns
  assert recall_tool.main(sweep) == 0 and result.stat().st_mtime_ns == first  # done cells are not rerun
  assert recall_tool.main(["--sweep_report", f"--out={tmp_path / 'sweep'}", "--seeds=0"]) == 0
  table = (tmp_path / "sweep" / "table.md").read_text()
  assert "| `gpt_spec` | 64 |" in table and "none" in table
  assert (tmp_path / "sweep" / "mqar_sweep.png").stat().st_size > 0


def test_tool_rejects_an_unknown_preset_and_a_bad_override(tmp_path, capsys):
  import recall as recall_tool  # tools/recall.py
  assert recall_tool.main(["--variant=qtg", "--task=lookup", "--preset=medium", f"--output={tmp_path / 'x.json'}"]) == 2
  assert "task lookup has ['hard', 'small']" in capsys.readouterr().err
  assert recall_tool.main(["--variant=qtg", "--task=mqar", "--set=model.no_such=1", "--steps=2",
                           f"--output={tmp_path / 'x.json'}"]) == 2
  assert "model.no_such" in capsys.readouterr().err
  assert not (tmp_path / "x.json").exists()


def test_the_sweep_skips_cells_above_a_level_the_arm_failed_and_runs_them_on_request(tmp_path, monkeypatch):
  from neon_qtg_jax.evaluation import recall_sweep  # pylint: disable=import-outside-toplevel
  ran = []

  def fake_run(task, preset, arm, seed, **kwargs):
    ran.append((arm, preset.spec.num_pairs, seed))
    solved = preset.spec.num_pairs == 4 or arm == "gpt_spec" or seed == 1  # qtg fails 8 pairs on seeds 0 and 2
    return {"variant": arm, "width": preset.width, "num_pairs": preset.spec.num_pairs, "seed": seed,
            "solved": solved, "accuracy": 1.0 if solved else 0.2, "no_recall_floor": 1 / preset.spec.num_pairs}

  monkeypatch.setattr(recall, "train_and_score", fake_run)
  todo = recall_sweep.cells(("qtg", "gpt_spec"), (4, 8, 16), (64,), (0, 1, 2))
  list(recall_sweep.run(str(tmp_path), todo, progress=lambda line: None))
  assert sorted(r for r in ran if r[0] == "qtg") == [("qtg", p, s) for p in (4, 8) for s in (0, 1, 2)]
  assert [r for r in ran if r[0] == "gpt_spec"] == [("gpt_spec", p, s) for p in (4, 8, 16) for s in (0, 1, 2)]
  summary = recall_sweep.readout(recall_sweep.read(str(tmp_path)), seeds=3)
  assert summary[("qtg", 64)]["largest_solved"] == 4  # final: the cells above 8 pairs cannot change it
  assert summary[("gpt_spec", 64)]["largest_solved"] is None  # 32 and 64 pairs not run: not complete
  assert summary[("gpt_spec", 64)]["solved_at_least"] == 16
  assert "| `gpt_spec` | 64 | 1.000 | 1.000 | 1.000 | not run | not run | at least 16 (not complete) |" in \
      recall_sweep.markdown(summary, seeds=3)
  ran.clear()
  list(recall_sweep.run(str(tmp_path), todo, every_cell=True, progress=lambda line: None))
  assert ran == [("qtg", 16, s) for s in (0, 1, 2)]  # only the skipped cells, and the readout is unchanged
  assert recall_sweep.readout(recall_sweep.read(str(tmp_path)), seeds=3)[("qtg", 64)]["largest_solved"] == 4
  # One failed seed settles a level while its other seeds still run elsewhere: nothing above it starts.
  first = [r for r in recall_sweep.read(str(tmp_path)) if (r["variant"], r["num_pairs"], r["seed"]) == ("qtg", 8, 0)]
  assert not first[0]["solved"]
  assert recall_sweep.settled_below(first, recall_sweep.Cell("qtg", 16, 64, 1)) == 8
  assert recall_sweep.settled_below(first, recall_sweep.Cell("qtg", 8, 64, 1)) is None
