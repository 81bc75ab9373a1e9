"""Perplexity of a checkpoint by sliding windows: every token scored once, with the longest context allowed.

A token stream of N tokens has targets at positions 1..N-1. Windows of `max_length` inputs
start every `stride` tokens; each scores only the targets that no earlier window scored, so
after the first window each target sees at least max_length - stride + 1 tokens of context.
The last window is moved back to end at the stream's end, which gives its targets more
context, not fewer. The stream starts with EOS (the separator the training stream puts
before every document but the first), so the first text token is scored too and bits per
byte divide the loss of every text token by every byte of the text.

  launch.py --mode=eval --workdir=runs/x [--checkpoint=best] [--eval_data=file.jsonl | --eval_split=tune]
            [--output=r.json]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from neon_qtg_jax.evaluation.plots import plot_token_losses
from neon_qtg_jax.loss import target_log_probs
from neon_qtg_jax.model.qtg import QTGModel

LogProbFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # inputs, targets (B, W) -> log p (B, W)
LOSS_BIN_EDGES = np.linspace(0.0, 20.0, 101)  # per-token loss histogram (nats); larger losses go in the last bin


@dataclasses.dataclass(frozen=True)
class Window:
  begin: int         # stream index of the first input token
  length: int        # inputs (= targets) in the window
  first_scored: int  # offset of the first target this window scores


def window_plan(num_tokens: int, max_length: int, stride: int) -> list[Window]:
  """Windows that together score each target position 1..num_tokens-1 exactly once."""
  if not 0 < stride <= max_length:
    raise ValueError(f"stride={stride} must be in (0, max_length={max_length}]")
  windows: list[Window] = []
  next_target = 1
  begin = 0
  while next_target < num_tokens:
    begin = min(begin, max(0, num_tokens - 1 - max_length))  # the last window ends at the stream's end
    length = min(max_length, num_tokens - 1 - begin)
    windows.append(Window(begin, length, next_target - (begin + 1)))
    next_target = begin + 1 + length
    begin += stride
  return windows


@dataclasses.dataclass(frozen=True)
class Score:
  nll: float          # summed negative log-likelihood, nats
  tokens: int         # scored targets
  windows: int
  loss_counts: np.ndarray | None = None  # tokens per LOSS_BIN_EDGES bin

  @property
  def loss(self) -> float:
    return self.nll / max(self.tokens, 1)


def _batches(tokens: np.ndarray, plan: list[Window], max_length: int, batch_size: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(inputs, targets, scored mask), each (batch_size, max_length); short windows and batches padded."""
  for start in range(0, len(plan), batch_size):
    inputs = np.zeros((batch_size, max_length), np.int32)
    targets = np.zeros((batch_size, max_length), np.int32)
    scored = np.zeros((batch_size, max_length), bool)
    for row, w in enumerate(plan[start:start + batch_size]):
      chunk = np.asarray(tokens[w.begin:w.begin + w.length + 1], np.int32)
      inputs[row, :w.length] = chunk[:-1]
      targets[row, :w.length] = chunk[1:]
      scored[row, w.first_scored:w.length] = True
    yield inputs, targets, scored


def score_stream(log_prob_fn: LogProbFn, tokens: np.ndarray, *, max_length: int, stride: int,
                 batch_size: int, progress: bool = True) -> Score:
  """Sliding-window negative log-likelihood of a 1-D token stream."""
  plan = window_plan(len(tokens), max_length, stride)
  nll, count = 0.0, 0
  loss_counts = np.zeros(len(LOSS_BIN_EDGES) - 1, np.int64)
  num_batches = -(-len(plan) // batch_size)
  bar = tqdm(_batches(tokens, plan, max_length, batch_size), total=num_batches, desc="perplexity",
             unit="batch", disable=not progress, file=sys.stdout)
  for inputs, targets, scored in bar:
    logp = np.asarray(log_prob_fn(inputs, targets), np.float64)
    nll -= float(np.sum(np.where(scored, logp, 0.0)))
    count += int(scored.sum())
    loss_counts += np.histogram(np.clip(-logp[scored], 0.0, LOSS_BIN_EDGES[-1]), LOSS_BIN_EDGES)[0]
    bar.set_postfix(loss=f"{nll / max(count, 1):.4f}")
  return Score(nll, count, len(plan), loss_counts)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _model_log_probs(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  return target_log_probs(nnx.merge(graphdef, state)(inputs), targets)


def model_log_prob_fn(model: QTGModel) -> LogProbFn:
  """log p(target) of every position, (B, W) int32 inputs and targets -> (B, W) float32, jit-compiled."""
  graphdef, state = nnx.split(model)
  return lambda inputs, targets: jax.device_get(_model_log_probs(graphdef, state, jnp.asarray(inputs),
                                                                 jnp.asarray(targets)))


def summary(score: Score, text_bytes: int | None) -> dict[str, float | int | None]:
  """loss (nats/token), perplexity = exp(loss), bits per byte (None without a byte count), token counts."""
  return {
      "loss": score.loss,
      "perplexity": math.exp(score.loss),
      "bits_per_byte": score.nll / math.log(2) / text_bytes if text_bytes else None,
      "tokens": score.tokens,
      "bytes": text_bytes,
      "windows": score.windows,
  }


def file_stream(path: str, tokenizer, data_cfg) -> tuple[np.ndarray, int, dict]:
  """A JSONL or text file as one stream (EOS, doc, EOS, doc, ..., EOS): (tokens, text bytes, issues dict)."""
  from neon_qtg_jax.data.sources import DataError, Issues, iter_documents
  issues = Issues()
  ids: list[int] = [tokenizer.eos_id]
  text_bytes = 0
  for doc in iter_documents(None, path, text_field=data_cfg.text_field, text_split=data_cfg.text_split,
                            issues=issues):
    ids.extend(tokenizer.encode(doc.text))
    ids.append(tokenizer.eos_id)
    text_bytes += len(doc.text.encode("utf-8"))
  if len(ids) < 2:
    raise DataError(f"{path}: no documents to score ({issues.summary()})")
  return np.asarray(ids, np.int32), text_bytes, issues.to_dict()


def validation_stream(data_dir: str, eos_id: int, split: str = "val") -> tuple[np.ndarray, int, dict]:
  """A prepared split ("val" or "tune") with a leading EOS: (tokens, text bytes, issues recorded at preparation)."""
  from neon_qtg_jax.data.manifest import Manifest
  from neon_qtg_jax.data.sources import DataError
  manifest = Manifest.load(data_dir)
  if split not in manifest.tokens:
    raise DataError(f"{data_dir}: no prepared '{split}' split (it holds {sorted(manifest.tokens)}); "
                    "prepare with data.tune_fraction > 0 into a new data.data_dir for a tuning split")
  tokens = manifest.split_tokens(split)
  if len(tokens) == 0:
    raise DataError(f"{data_dir}: the prepared '{split}' split is empty (data.val_fraction or "
                    "data.tune_fraction too small?)")
  stream = np.concatenate([np.asarray([eos_id], tokens.dtype), tokens])
  return stream, manifest.text_bytes[split], manifest.issues


def run(config, args) -> int:
  """--mode=eval: perplexity of a checkpoint on a prepared split (--eval_split) or --eval_data; writes a JSON result."""
  from neon_qtg_jax.evaluation.result_files import claimed, data_tag, result_path
  from neon_qtg_jax.evaluation.tool_cli import write_json
  from neon_qtg_jax.inference import restore as restore_lib
  from neon_qtg_jax.inference.quantize import load_for_inference

  from neon_qtg_jax.parallel import ShardingConfig

  restored = load_for_inference(args.workdir, args.checkpoint, config,  # inference.weight_dtype
                                sharding=ShardingConfig.from_config(config.parallel))
  data_dir = restore_lib.data_dir(restored.run_config, config)  # only read for a prepared split
  tokenizer = restore_lib.load_tokenizer(args.workdir, args.checkpoint, restored.run_config, config)
  if tokenizer.vocab_size > restored.model.cfg.vocab_size:
    print(f"error: the checkpoint's tokenizer has {tokenizer.vocab_size} ids, the model {restored.model.cfg.vocab_size}",
          file=sys.stderr)
    return 2
  if args.eval_data:
    tokens, text_bytes, issues = file_stream(args.eval_data, tokenizer, config.data)
    source = os.path.abspath(args.eval_data)
  else:
    if not os.path.isdir(data_dir):  # a workdir evaluated away from where it trained
      print(f"error: the {args.eval_split} split is read from data.data_dir {data_dir!r}, which is not here "
            f"({os.path.abspath(data_dir)}); pass --config.data.data_dir=/abs/path/of/the/prepared/data or "
            "score a file with --eval_data", file=sys.stderr)
      return 2
    tokens, text_bytes, issues = validation_stream(data_dir, tokenizer.eos_id, args.eval_split)
    source = f"{os.path.abspath(data_dir)} ({args.eval_split} split)"
  max_length = min(config.eval.max_length, restored.model.cfg.max_seq_len)
  settings = {"len": max_length, "stride": config.eval.stride}
  if restored.weight_dtype != "float32":
    settings["weights"] = restored.weight_dtype
  output = args.output or result_path(args.workdir, "perplexity", data_tag(args.eval_data, args.eval_split),
                                      step=restored.step, settings=settings)
  plot_path = os.path.splitext(output)[0] + ".png"
  with claimed([output, plot_path], args.overwrite):  # before the work, not after it
    print(f"scoring {len(tokens) - 1} tokens of {source} with checkpoint step {restored.step}, "
          f"windows of {max_length} at stride {config.eval.stride}")
    score = score_stream(model_log_prob_fn(restored.model), tokens, max_length=max_length,
                         stride=min(config.eval.stride, max_length), batch_size=config.training.batch_size)
    result = summary(score, text_bytes) | {
        "checkpoint_step": restored.step, "data": source, "max_length": max_length, "stride": config.eval.stride,
        "workdir": os.path.abspath(args.workdir), "bad_input": issues, "param_dtype": restored.param_dtype,
        "weight_dtype": restored.weight_dtype, "compute_dtype": restored.model.cfg.dtype,
    }
    write_json(output, result)
    plot_token_losses(LOSS_BIN_EDGES, score.loss_counts, score.loss, plot_path,
                      f"per-token loss, checkpoint step {restored.step}, {os.path.basename(source)}")
  bpb = f"{result['bits_per_byte']:.4f}" if result["bits_per_byte"] is not None else "n/a"
  print(f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.3f}, bits/byte {bpb}, "
        f"{result['tokens']} tokens -> {output} (histogram {plot_path})")
  counts = issues.get("counts", {}) if isinstance(issues, dict) else {}
  if counts:
    print(f"bad input skipped or repaired: {counts} (details in {output})")
  return 0
