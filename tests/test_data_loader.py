"""Windows and the Grain loader: shifted targets, epochs, per-process shards, exact resume, eval batches."""

import collections
import os
import random
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.data import loader
from neon_qtg_jax.data.loader import WindowSource, num_windows
from neon_qtg_jax.data.prepare import prepare_dataset
from neon_qtg_jax.data.sources import DataError

WORDS = "the quick brown fox jumps over a lazy dog while tabs\tand newlines\nkeep their place".split(" ")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  root = tmp_path_factory.mktemp("loader")
  rng = random.Random(0)
  corpus = root / "corpus"
  corpus.mkdir()
  for i in range(80):
    (corpus / f"d{i:03d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))))
  c = default_config()
  c.model.vocab_size = 320
  c.data.source = "text"
  c.data.paths = str(corpus)
  c.data.data_dir = str(root / "data")
  c.data.val_fraction = 0.2
  c.data.tokenizer_sample_sentences = 1000
  c.data.max_length = 16
  c.data.stride = 8
  c.training.batch_size = 4
  c.training.grad_accum_steps = 2
  c.training.eval_batches = 3
  validate(c)
  prepare_dataset(c, progress=False, num_processes=1)
  return c


def with_data(config, **data):
  c = config.copy_and_resolve_references()
  for k, v in data.items():
    c.data[k] = v
  return c


def rows(batch) -> list[tuple]:
  return [tuple(r) for r in batch["inputs"].tolist()]


@pytest.mark.parametrize("num_tokens,length,stride", [(100, 16, 8), (17, 16, 8), (16, 16, 8), (1000, 32, 32),
                                                      (50, 4, 3)])
def test_windows_match_plain_slicing(tmp_path, num_tokens, length, stride):
  tokens = np.random.default_rng(0).integers(0, 60000, num_tokens).astype(np.uint16)
  path = tmp_path / "t.bin"
  tokens.tofile(path)
  source = WindowSource(str(path), "uint16", num_tokens, length, stride)
  starts = [s for s in range(0, num_tokens, stride) if s + length + 1 <= num_tokens]
  assert len(source) == len(starts) == num_windows(num_tokens, length, stride)
  for i, s in enumerate(starts):
    item = source[i]
    assert item["inputs"].dtype == np.int32 and item["inputs"].shape == (length,)
    np.testing.assert_array_equal(item["inputs"], tokens[s:s + length])
    np.testing.assert_array_equal(item["targets"], tokens[s + 1:s + length + 1])
  with pytest.raises(IndexError):
    source[len(source)]


def test_batches_are_shifted_windows_of_the_train_split(config):
  it = loader.make_train_iterator(config, shard_index=0, shard_count=1)
  batch = next(it)
  assert set(batch) == {"inputs", "targets"}
  assert batch["inputs"].shape == batch["targets"].shape == (8, 16)   # batch_size * grad_accum_steps
  assert batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  tokens = np.asarray(loader.split_tokens(config, "train"))
  windows = {tuple(tokens[s:s + 16]) for s in range(0, len(tokens) - 16, 8)}
  assert set(rows(batch)) <= windows


def test_one_epoch_visits_every_window_once_and_order_changes_per_epoch(config):
  source = loader.window_source(config, "train")
  per_epoch = len(source) // 8
  it = loader.make_train_iterator(config, shard_index=0, shard_count=1)
  first = [r for _ in range(per_epoch) for r in rows(next(it))]
  all_windows = collections.Counter(tuple(source[i]["inputs"]) for i in range(len(source)))
  # No window twice within an epoch (the toy corpus repeats some window contents: compare multiplicities).
  assert not collections.Counter(first) - all_windows
  second = [r for _ in range(per_epoch) for r in rows(next(it))]
  assert second != first


def test_shuffle_seed_controls_order(config):
  a = next(loader.make_train_iterator(config, shard_index=0, shard_count=1))
  b = next(loader.make_train_iterator(config, shard_index=0, shard_count=1))
  c = next(loader.make_train_iterator(with_data(config, shuffle_seed=1), shard_index=0, shard_count=1))
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_process_shards_split_the_global_batch_disjointly(config):
  source = loader.window_source(config, "train")
  steps = len(source) // 2 // 4                      # one epoch of each process's half
  seen = collections.Counter()
  for i in range(2):
    it = loader.make_train_iterator(config, shard_index=i, shard_count=2)
    batches = [next(it) for _ in range(steps)]
    assert all(b["inputs"].shape == (4, 16) for b in batches)
    seen.update(r for b in batches for r in rows(b))
  # Together the processes use no window more often than it exists (content repeats in this corpus).
  assert not seen - collections.Counter(tuple(source[i]["inputs"]) for i in range(len(source)))


def test_global_batch_must_divide_over_processes(config):
  with pytest.raises(DataError, match="batch_size"):
    loader.make_train_iterator(config, shard_index=0, shard_count=3)


def save_and_resume(config, tmp_path, skip: int, check: int):
  """Batches check..: from an uninterrupted iterator, and from one restored after `skip` batches."""
  it = loader.make_train_iterator(config, shard_index=0, shard_count=1)
  for _ in range(skip):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.save(skip, args=ocp.args.Composite(data=loader.iterator_save_args(it)))
    expected = [next(it) for _ in range(check)]   # keeps going while the save may still be writing
    manager.wait_until_finished()
  resumed = loader.make_train_iterator(config, shard_index=0, shard_count=1)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.restore(manager.latest_step(), args=ocp.args.Composite(data=loader.iterator_restore_args(resumed)))
  got = [next(resumed) for _ in range(check)]
  return expected, got


def test_resume_continues_exactly(config, tmp_path):
  expected, got = save_and_resume(config, tmp_path, skip=7, check=12)   # crosses an epoch boundary
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e["inputs"], g["inputs"])
    np.testing.assert_array_equal(e["targets"], g["targets"])


def test_resume_continues_exactly_with_worker_processes(config, tmp_path):
  expected, got = save_and_resume(with_data(config, num_workers=2, prefetch=2), tmp_path, skip=5, check=6)
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e["inputs"], g["inputs"])


def test_restore_into_a_different_pipeline_is_refused(config, tmp_path):
  it = loader.make_train_iterator(config, shard_index=0, shard_count=1)
  next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    manager.save(1, args=ocp.args.Composite(data=loader.iterator_save_args(it)))
    manager.wait_until_finished()
  other = loader.make_train_iterator(with_data(config, shuffle_seed=5), shard_index=0, shard_count=1)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
    with pytest.raises(ValueError, match="Sampler"):
      manager.restore(1, args=ocp.args.Composite(data=loader.iterator_restore_args(other)))


def test_eval_batches_are_fixed_and_from_the_val_split(config):
  a = loader.eval_batches(config)
  b = loader.eval_batches(config)
  assert len(a) == 3 and all(x["inputs"].shape == (4, 16) for x in a)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])
  val = np.asarray(loader.split_tokens(config, "val"))
  val_windows = {tuple(val[s:s + 16]) for s in range(0, len(val) - 16, 8)}
  assert {r for x in a for r in rows(x)} <= val_windows
  assert len(loader.eval_batches(config, num_batches=10 ** 6, batch_size=1)) == len(loader.window_source(config, "val"))


def test_eval_batches_too_small_split_is_a_clear_error(config):
  n = len(loader.window_source(config, "val"))
  with pytest.raises(DataError, match="val split"):
    loader.eval_batches(config, num_batches=1, batch_size=n + 1)


def test_split_tokens_end_with_eos_per_document(config):
  manifest = loader.load_manifest(config)
  for split in ("train", "val"):
    tokens = loader.split_tokens(config, split)
    assert isinstance(tokens, np.memmap) and tokens.ndim == 1 and len(tokens) == manifest.tokens[split]
    assert int((np.asarray(tokens) == manifest.tokenizer["eos_id"]).sum()) == manifest.documents[split]


def test_unigram_perplexity_matches_plain_formula():
  rng = np.random.default_rng(0)
  train = rng.integers(0, 50, 500)
  val = rng.integers(0, 60, 200)
  counts = {i: 1 for i in range(64)}
  for t in train:
    counts[int(t)] += 1
  total = sum(counts.values())
  expected = float(np.exp(-np.mean([np.log(counts[int(t)] / total) for t in val])))
  assert loader.unigram_perplexity(train, val, 64) == pytest.approx(expected, rel=1e-9)
  assert loader.unigram_perplexity(np.zeros(0, int), np.arange(10), 10) == pytest.approx(10.0)
  with pytest.raises(DataError):
    loader.unigram_perplexity(train, np.zeros(0, int), 64)


def test_missing_data_dir_is_prepared_on_first_use(config, tmp_path):
  c = config.copy_and_resolve_references()
  c.data.data_dir = str(tmp_path / "fresh")
  assert not os.path.exists(c.data.data_dir)
  assert len(loader.split_tokens(c, "train")) == len(loader.split_tokens(config, "train"))


def test_saved_state_restores_when_the_data_dir_moved(config, tmp_path):
  it = loader.make_train_iterator(config, shard_index=0, shard_count=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  moved = config.copy_and_resolve_references()
  moved.data.data_dir = str(tmp_path / "moved")
  shutil.copytree(config.data.data_dir, moved.data.data_dir)
  resumed = loader.make_train_iterator(moved, shard_index=0, shard_count=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["inputs"], expected["inputs"])
