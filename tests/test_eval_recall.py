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


def test_mqar_rows_score_each_queried_keys_value_and_never_show_it():
  spec = _spec("mqar")
  rows = recall.make_rows(spec, seed=3, rows=200)
  full_inputs, n = rows["inputs"], spec.num_pairs
  assert full_inputs.shape == (200, spec.seq_len - 1) and rows["mask"].sum(axis=1).tolist() == [spec.num_queries] * 200
  half = spec.vocab_size // 2
  for inputs, targets, mask in zip(full_inputs, rows["targets"], rows["mask"]):
    keys, values = inputs[0:2 * n:2], np.append(inputs[1:2 * n:2], [])
    assert len(set(keys.tolist())) == n and (keys >= 1).all() and (keys < half).all()
    pairs = dict(zip(keys.tolist(), np.append(values, targets[2 * n - 1])[:n].tolist()))
    for position in np.flatnonzero(mask):
      queried = inputs[position]
      assert queried in pairs and targets[position] == pairs[queried]  # the value stored with that key
    after_context = inputs[2 * n:]
    assert (after_context[1::2] == 0).all()  # every query is followed by a blank, never by its answer
    assert not set(after_context.tolist()) & set(range(half, spec.vocab_size))


def test_lookup_rows_hold_one_pair_per_key_and_score_its_value():
  spec = _spec("lookup")
  rows = recall.make_rows(spec, seed=1, rows=100)
  pair_base = 1 + spec.num_keys + spec.num_values
  for inputs, targets, mask in zip(rows["inputs"], rows["targets"], rows["mask"]):
    pairs = inputs[:spec.num_pairs] - pair_base
    stored = dict(zip((pairs // spec.num_values).tolist(), (pairs % spec.num_values).tolist()))
    assert len(stored) == spec.num_pairs  # distinct keys
    for position in np.flatnonzero(mask):
      key = inputs[position] - 1
      assert targets[position] - (1 + spec.num_keys) == stored[key]


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


def test_rows_are_a_function_of_the_seed_and_held_out_rows_differ():
  spec = _spec("mqar")
  a, b = recall.make_rows(spec, 5, 64), recall.make_rows(spec, 5, 64)
  assert all((a[k] == b[k]).all() for k in a)
  held_out = recall.make_rows(spec, 5 + recall.HELD_OUT_STREAM, 64)
  assert not (held_out["inputs"] == a["inputs"]).all(axis=1).any()


@pytest.mark.parametrize("variant", ["qtg", "qtg_seed", "gpt"])
def test_tool_writes_the_record_with_entropy_per_layer(tmp_path, variant, capsys):
  import recall as recall_tool  # tools/recall.py
  output = tmp_path / "r.json"
  assert recall_tool.main([f"--variant={variant}", "--task=mqar", "--preset=small", "--seed=0", "--steps=6",
                           f"--output={output}"]) == 0
  record = json.loads(output.read_text())
  preset = recall.PRESETS["mqar"]["small"]
  assert record["steps"] == 6 and record["chance"] == 1 / preset.spec.num_pairs
  assert 0.0 <= record["accuracy"] <= 1.0 and record["seconds"] > 0
  assert len(record["attention_entropy"]) == preset.num_layers
  assert all(0.0 < e <= 1.0 + 1e-6 for e in record["attention_entropy"])
  assert record["overrides"] == dict(recall.VARIANTS[variant])
  assert "accuracy" in capsys.readouterr().out


def test_tool_rejects_an_unknown_preset_and_a_bad_override(tmp_path, capsys):
  import recall as recall_tool  # tools/recall.py
  assert recall_tool.main(["--variant=qtg", "--task=lookup", "--preset=medium", f"--output={tmp_path / 'x.json'}"]) == 2
  assert "task lookup has ['hard', 'small']" in capsys.readouterr().err
  assert recall_tool.main(["--variant=qtg", "--task=mqar", "--set=model.no_such=1", "--steps=2",
                           f"--output={tmp_path / 'x.json'}"]) == 2
  assert "model.no_such" in capsys.readouterr().err
  assert not (tmp_path / "x.json").exists()
