"""lm-evaluation-harness model "neon_qtg": any harness task on a checkpoint (pip install -e ".[harness]").

  neon-qtg-lm-eval --model neon_qtg --model_args checkpoint=runs/tiny --tasks hellaswag,arc_easy
  python -m neon_qtg_jax.evaluation.lm_eval_cli --model neon_qtg --model_args checkpoint=s3://b/run,step=best ...

Both are lm_eval's own command line (same flags) with this module imported first: lm_eval 0.4
finds models only in the registry that its own lm_eval/models/__init__.py fills, with no
plugin entry point, so a bare `lm_eval --model neon_qtg` cannot know an external model. In
Python, importing this module registers it for `lm_eval.simple_evaluate(model="neon_qtg", ...)`.

model_args: checkpoint (a run directory, a checkpoint directory or a backup URL), step ("best",
"latest" or a number), batch_size, max_length (default model.max_seq_len), max_gen_toks (256),
weight_dtype (float32, bfloat16, int8: inference.weight_dtype), seed.

Text is encoded after an EOS, the separator the training stream puts before every document:
- loglikelihood(context, continuation): the continuation's tokens are those of context +
  continuation after the context's (lm_eval's HF convention); contexts longer than the window
  keep their last tokens; batched by length (evaluation/loglik.py);
- loglikelihood_rolling(text): our perplexity evaluation (evaluation/perplexity.py) of the
  stream EOS + text with the run's eval.max_length windows at eval.stride: every token scored
  once, as `--mode=eval` scores it;
- generate_until(context, {until, max_gen_toks, do_sample, temperature, top_p}): batched cached
  decoding (inference/sampling.py), greedy unless do_sample, cut at the first `until` string.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401 - lm_eval's own models first: it fills its registry only while that is empty
import ml_collections
import numpy as np
from flax import nnx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from neon_qtg_jax.evaluation.loglik import continuation_scores
from neon_qtg_jax.evaluation.perplexity import model_log_prob_fn, score_stream
from neon_qtg_jax.loss import target_log_probs

DEFAULT_MAX_GEN_TOKS = 256


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _log_probs_and_greedy(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, targets: jax.Array):
  logits = nnx.merge(graphdef, state)(inputs)
  return target_log_probs(logits, targets), jnp.argmax(logits, axis=-1) == targets


@register_model("neon_qtg")
class NeonQTGLM(LM):
  """A NEON-QTG checkpoint as an lm_eval language model."""

  def __init__(self, checkpoint: str, step: str | int = "best", batch_size: int | str = 8,
               max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
               weight_dtype: str = "float32", seed: int = 0, **unused: Any):
    super().__init__()
    from neon_qtg_jax.config import default_config, validate
    from neon_qtg_jax.inference.quantize import load_for_inference
    from neon_qtg_jax.inference.restore import load_tokenizer
    from neon_qtg_jax.parallel import ShardingConfig

    config = default_config()
    config.inference.weight_dtype = weight_dtype
    validate(config)
    step = int(step) if str(step).isdigit() else step
    restored = load_for_inference(str(checkpoint), step, config, sharding=ShardingConfig.from_config(config.parallel))
    self.model, self.step, self.weight_dtype = restored.model, restored.step, restored.weight_dtype
    self.sharding = restored.sharding
    self.tokenizer = load_tokenizer(str(checkpoint), step, restored.run_config)  # carried by the checkpoint
    self.context = int(self.model.cfg.max_seq_len)
    self.window = min(int(max_length or self.context), self.context)
    # loglikelihood_rolling scores like --mode=eval with the run's eval windows
    self.eval_window = min(int(restored.run_config.eval.max_length), self.window)
    self.eval_stride = min(int(restored.run_config.eval.stride), self.eval_window)
    self.batch_size = int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 8
    self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
    self.graphdef, self.state = nnx.split(self.model)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
    """model_args win over the command line's generic settings (its --batch_size default of 1 among them)."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
    from lm_eval.utils import simple_parse_args_string
    return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

  # ---- scoring
  def _score(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logp, greedy = _log_probs_and_greedy(self.graphdef, self.state, jnp.asarray(inputs), jnp.asarray(targets))
    return jax.device_get(logp), jax.device_get(greedy)

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], int]:
    """(EOS + context + continuation ids cut on the left to window + 1, continuation length)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:  # a trailing space belongs to the continuation's first token (lm_eval's convention)
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = [self.tokenizer.eos_id] + self.tokenizer.encode(context)
    whole = [self.tokenizer.eos_id] + self.tokenizer.encode(context + continuation)
    n = len(whole) - len(context_ids)
    if whole[:len(context_ids)] != context_ids or n < 1:  # the join changed the context's tokens
      cont = self.tokenizer.encode(continuation)
      whole, n = context_ids + cont, len(cont)
    if n < 1:
      raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return whole[-(self.window + 1):], min(n, self.window)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    sequences = [self.encode_pair(*r.args) for r in requests]
    scores, greedy = continuation_scores(self._score, sequences, max_length=self.window,
                                         batch_size=self.batch_size, progress=not disable_tqdm)
    return [(float(s), bool(g)) for s, g in zip(scores, greedy)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    log_prob_fn = model_log_prob_fn(self.model)
    out = []
    for r in tqdm(requests, desc="rolling log-likelihood", disable=disable_tqdm, file=sys.stdout):
      tokens = np.asarray([self.tokenizer.eos_id] + self.tokenizer.encode(r.args[0]), np.int32)
      if len(tokens) < 2:
        out.append(0.0)
        continue
      score = score_stream(log_prob_fn, tokens, max_length=self.eval_window, stride=self.eval_stride,
                           batch_size=self.batch_size, progress=False)
      out.append(-score.nll)
    return out

  # ---- generation
  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from neon_qtg_jax.inference.sampling import encode_prompts, continue_prompts

    groups: dict[tuple, list[int]] = {}
    settings = []
    for i, r in enumerate(requests):
      context, kwargs = r.args
      kwargs = dict(kwargs or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.context - 1)
      sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
      temperature = float(kwargs.pop("temperature", 1.0)) if sample else 0.0
      top_p = float(kwargs.pop("top_p", 1.0)) if sample else 1.0
      settings.append((context, until))
      groups.setdefault((max_new, temperature, top_p), []).append(i)
    results: list[str] = [""] * len(requests)
    bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, file=sys.stdout)
    for (max_new, temperature, top_p), indices in groups.items():
      sampling = ml_collections.ConfigDict(dict(temperature=temperature, top_k=0, top_p=top_p))
      for start in range(0, len(indices), self.batch_size):
        chosen = indices[start:start + self.batch_size]
        prompt_ids, _ = encode_prompts(self.tokenizer, [settings[i][0] for i in chosen], self.context - max_new)
        outputs = continue_prompts(self.model, prompt_ids, sampling_cfg=sampling, max_new_tokens=max_new,
                                   eos_id=self.tokenizer.eos_id, seed=self.seed + start,
                                   valid_vocab=self.tokenizer.vocab_size, sharding=self.sharding)
        for i, ids in zip(chosen, outputs):
          results[i] = cut_at_stop(self.tokenizer.decode(ids), settings[i][1])
        bar.update(len(chosen))
    bar.close()
    return results

  def get_model_info(self) -> dict[str, Any]:
    return {"neon_qtg_step": self.step, "neon_qtg_weight_dtype": self.weight_dtype, "max_length": self.window}


def cut_at_stop(text: str, until: list[str]) -> str:
  """text up to the first occurrence of any stop string."""
  cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
  return text[:cut]

