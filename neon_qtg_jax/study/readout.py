"""What a study reads from a trained run's model besides its loss: the attention's learned per-head
scalars and how far its attention is from uniform, per layer.

Learned scalars are found in the parameter tree, not by name: every parameter under `blocks/attn`
whose shape is (num_layers, num_heads) is one scalar per layer and head (gamma today; any new one,
such as a per-head logit scale, shows up without code changes here). Convention: a parameter
whose name ends in `_raw` is stored before a softplus (gamma_raw -> gamma = softplus(gamma_raw)),
so it is reported as softplus(value) under the name without `_raw`; any other is reported as stored.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

RAW_SUFFIX = "_raw"


def attention_scalars(model) -> dict[str, list[list[float]]]:
  """{name: (layers, heads) values} of every learned per-head scalar of the attention (see the module doc)."""
  shape = (model.cfg.num_layers, model.cfg.num_heads)
  out = {}
  for path, variable in nnx.to_flat_state(nnx.state(model.blocks.attn, nnx.Param)):
    value = np.asarray(jax.device_get(variable.get_value()), np.float64)
    if value.shape != shape:
      continue
    name = "/".join(str(part) for part in path)
    if name.endswith(RAW_SUFFIX):
      name, value = name[:-len(RAW_SUFFIX)], np.logaddexp(0.0, value)  # softplus
    out[name] = value.round(4).tolist()
  return out


def attention_entropy(model, config, windows: int = 8) -> tuple[list[list[float]] | None, str]:
  """(attention entropy / log(t + 1) per layer and head (layers, heads), '') on `windows` fixed validation
  windows (analysis.normalized_entropy: 1 is uniform over the prefix, 0 one token); (None, why) when
  analysis.layer_traces cannot reproduce this model's attention."""
  from neon_qtg_jax.analysis import layer_traces, normalized_entropy  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.data import loader  # pylint: disable=import-outside-toplevel
  batch = loader.eval_batches(config, "val", num_batches=1, batch_size=min(windows, config.training.batch_size))[0]
  try:
    traces = layer_traces(model, np.asarray(batch["inputs"]))
  except ValueError as err:
    return None, str(err)
  return normalized_entropy(traces["attention"]).round(4).tolist(), ""
