"""Training windows over the prepared token stream, served by a Grain DataLoader.

Window i of a split covers tokens [i * stride, i * stride + max_length + 1): `inputs` are the
first max_length tokens, `targets` the same shifted by one. Windows cross document boundaries;
documents are separated by EOS.

Checkpointing the iterator inside an Orbax CheckpointManager composite item:

  it = make_train_iterator(config)                    # built, not started
  manager = ocp.CheckpointManager(workdir, item_names=("state", "data"))
  if (step := manager.latest_step()) is not None:     # restore before the first next()
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=iterator_restore_args(it)))
  batch = next(it)                                    # {"inputs", "targets"}: int32 (G, L)
  ...
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=iterator_save_args(it)))

The restored iterator yields exactly the batches an uninterrupted run would have yielded next.
Never call next() before restoring: a started iterator has already consumed batches.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import flags
import grain
import grain.python as pygrain
import numpy as np

from neon_qtg_jax.data.manifest import Manifest
from neon_qtg_jax.data.sources import DataError
from neon_qtg_jax.data.stats import token_counts, unigram_perplexity  # re-exported for the trainer


def num_windows(num_tokens: int, max_length: int, stride: int) -> int:
  """Windows of max_length inputs (+1 target token) at the given stride inside num_tokens."""
  if num_tokens < max_length + 1:
    return 0
  return (num_tokens - max_length - 1) // stride + 1


class WindowSource:
  """Random-access Grain source: window i -> {"inputs": int32 (L,), "targets": int32 (L,)}.

  Holds only the path; the memmap is opened lazily in each process (worker processes included).
  """

  def __init__(self, path: str, dtype: str, num_tokens: int, max_length: int, stride: int, name: str = ""):
    self.path, self.dtype, self.num_tokens = os.path.abspath(path), dtype, num_tokens
    self.name = name or os.path.basename(path)
    self.max_length, self.stride = max_length, stride
    self._len = num_windows(num_tokens, max_length, stride)
    self._tokens: np.memmap | None = None

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    # Grain compares this string when restoring a checkpoint: it pins the data (not its path, so a
    # run can resume on another machine) to the saved state.
    return (f"WindowSource(name={self.name!r}, tokens={self.num_tokens}, max_length={self.max_length}, "
            f"stride={self.stride})")

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k != "_tokens"} | {"_tokens": None}

  def tokens(self) -> np.memmap:
    if self._tokens is None:
      self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
    return self._tokens

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self._len:
      raise IndexError(f"window {index} out of range [0, {self._len})")
    start = int(index) * self.stride
    window = np.asarray(self.tokens()[start:start + self.max_length + 1], dtype=np.int32)
    return {"inputs": window[:-1], "targets": window[1:]}


def load_manifest(config) -> Manifest:
  """The prepared data of config.data.data_dir; prepares it first in a single-process run."""
  try:
    return Manifest.load(config.data.data_dir)
  except DataError:
    import jax  # only to learn whether other processes could be preparing the same directory
    if jax.process_count() > 1:
      raise
  from neon_qtg_jax.data.prepare import prepare_dataset
  return prepare_dataset(config)


def window_source(config, split: str, manifest: Manifest | None = None) -> WindowSource:
  manifest = manifest or load_manifest(config)
  return WindowSource(manifest.split_path(split), manifest.dtype, manifest.tokens[split],
                      config.data.max_length, config.data.stride,
                      name=f"{split} split, tokenizer {manifest.tokenizer['sha256'][:16]}")


class RowBlockSampler:
  """Block `shard_index` of `shard_count` of every global batch of one shuffled global sequence.

  Local index i is row i % rows of batch i // rows, i.e. position (i // rows) * G + offset + i % rows
  of the global sequence. Every process count reads the same global batches (without workers).
  """

  def __init__(self, num_records: int, seed: int, global_rows: int, shard_index: int, shard_count: int):
    self._global = pygrain.IndexSampler(num_records=num_records, shuffle=True, num_epochs=None, seed=seed)
    self.global_rows, self.rows = global_rows, global_rows // shard_count
    self.offset = shard_index * self.rows
    self._repr = (f"RowBlockSampler(num_records={num_records}, seed={seed}, global_rows={global_rows}, "
                  f"block={shard_index} of {shard_count})")

  def __len__(self) -> int:
    return len(self._global)

  def __repr__(self) -> str:
    return self._repr  # Grain checks it on restore: a state saved under another process layout is refused

  def __getitem__(self, index: int) -> pygrain.RecordMetadata:
    position = (index // self.rows) * self.global_rows + self.offset + index % self.rows
    record = self._global[position]
    return pygrain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)


def make_train_iterator(config, *, shard_index: int | None = None, shard_count: int | None = None,
                        read_options: pygrain.ReadOptions | None = None) -> grain.DataLoaderIterator:
  """Endless shuffled training batches for this process: {"inputs", "targets"} int32 (G / shard_count, L).

  G = training.batch_size * training.grad_accum_steps rows per optimizer step across all processes;
  this process gets block shard_index of shard_count of each global batch (RowBlockSampler).
  Shuffling is seeded by data.shuffle_seed and differs per epoch. shard_index / shard_count
  default to jax.process_index() / jax.process_count(). read_options overrides the reader
  threads and buffer (benchmarks only).
  """
  if shard_index is None or shard_count is None:
    import jax
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  global_rows = config.training.batch_size * config.training.grad_accum_steps
  if global_rows % shard_count:
    raise DataError(f"training.batch_size * training.grad_accum_steps = {global_rows} rows per step "
                    f"cannot be split evenly over {shard_count} processes")
  source = window_source(config, "train")
  if len(source) < shard_count:
    raise DataError(f"{source.path}: {source.num_tokens} tokens make {len(source)} training windows of "
                    f"data.max_length={config.data.max_length}; too few for {shard_count} process(es)")
  if config.data.num_workers > 0 and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags; outside launch.py nobody parsed them
  shard_options = pygrain.NoSharding()  # the sampler picks this process's rows
  sampler = RowBlockSampler(len(source), config.data.shuffle_seed, global_rows, shard_index, shard_count)
  rows = global_rows // shard_count
  # A window is one memmap slice: reader threads only add GIL contention and buffer polling
  # (with no worker processes Grain's default 16 threads / 500 records ran 7x slower; tools/bench_data.py).
  read_options = read_options or pygrain.ReadOptions(num_threads=0, prefetch_buffer_size=rows)
  loader = pygrain.DataLoader(
      data_source=source, sampler=sampler, shard_options=shard_options,
      operations=[pygrain.Batch(batch_size=rows, drop_remainder=True)],
      worker_count=config.data.num_workers, worker_buffer_size=config.data.prefetch, read_options=read_options)
  return iter(loader)


def iterator_save_args(iterator: grain.DataLoaderIterator) -> Any:
  """Orbax args that save the iterator's position (one JSON file per process)."""
  return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DataLoaderIterator) -> Any:
  """Orbax args that set a freshly built, not yet started iterator to the saved position."""
  return grain.checkpoint.CheckpointRestore(iterator)


def has_iterator_state(step_dir: str, process_index: int, process_count: int) -> bool:
  """Whether a checkpoint step holds the iterator state of this process under this process count."""
  return os.path.exists(os.path.join(step_dir, "data", f"process_{process_index}-of-{process_count}.json"))


def skip_to_step(iterator: grain.DataLoaderIterator, steps: int, rows: int) -> None:
  """Sets a fresh iterator of `rows` per batch to where it is after `steps` batches.

  For a resume under another process layout, whose saved per-process positions do not apply.

  Only without worker processes (then local index i is row i % rows of batch i // rows).
  """
  state = json.loads(iterator.get_state())
  if state["worker_count"]:
    raise DataError(f"cannot resume the data position under another process layout with data.num_workers="
                    f"{state['worker_count']}; resume with the saved layout or data.num_workers=0")
  state["last_seen_indices"] = {"0": steps * rows - 1}
  iterator.set_state(json.dumps(state).encode())


def eval_batches(config, split: str = "val", num_batches: int | None = None,
                 batch_size: int | None = None) -> list[dict[str, np.ndarray]]:
  """A fixed set of windows spread evenly over the split, the same on every call and process.

  Defaults: training.eval_batches batches of training.batch_size rows. Returns fewer batches when
  the split holds fewer windows; raises DataError when it cannot fill one batch.
  """
  num_batches = num_batches or config.training.eval_batches
  batch_size = batch_size or config.training.batch_size
  source = window_source(config, split)
  available = len(source) // batch_size
  if available == 0:
    raise DataError(f"{source.path}: the {split} split holds {len(source)} windows of "
                    f"data.max_length={config.data.max_length}, fewer than one batch of {batch_size}; "
                    f"raise data.val_fraction or use a larger corpus")
  count = min(num_batches, available) * batch_size
  indices = np.linspace(0, len(source) - 1, count).round().astype(np.int64)
  rows = [source[int(i)] for i in indices]
  return [{key: np.stack([r[key] for r in rows[b:b + batch_size]]) for key in ("inputs", "targets")}
          for b in range(0, count, batch_size)]


def split_tokens(config, split: str) -> np.ndarray:
  """A split's tokens as a 1-D read-only memmap, EOS separators included."""
  return load_manifest(config).split_tokens(split)
