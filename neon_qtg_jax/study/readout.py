"""What a study reads from a trained run's model besides its loss: the attention's learned per-head
scalars and how far its attention is from uniform, per layer.

Learned scalars come from the attention's own `learned_scales()` (gamma, and beta for the scaled and
normed sphere maps), which knows how each is stored (softplus or exp of a scaled raw parameter), so a
new per-head scale is reported once the model lists it there.
"""

from __future__ import annotations

import jax
import numpy as np


def attention_scalars(model) -> dict[str, list[list[float]]]:
  """{name: (layers, heads) values} of every learned per-head scale of the attention."""
  return {name: np.asarray(jax.device_get(value), np.float64).round(4).tolist()
          for name, value in model.learned_scales().items()}


def attention_entropy(model, config, windows: int = 8) -> tuple[list[list[float]] | None, str]:
  """(attention entropy / log(t + 1) per layer and head (layers, heads), '') on `windows` fixed validation
  windows (analysis.normalized_entropy: 1 is uniform over the prefix, 0 one token), from the probabilities
  the model's attention sows (analysis.layer_traces); (None, why) when they cannot be read."""
  from neon_qtg_jax.analysis import layer_traces, normalized_entropy  # pylint: disable=import-outside-toplevel
  from neon_qtg_jax.data import loader  # pylint: disable=import-outside-toplevel
  batch = loader.eval_batches(config, "val", num_batches=1, batch_size=min(windows, config.training.batch_size))[0]
  try:
    traces = layer_traces(model, np.asarray(batch["inputs"]))
  except ValueError as err:
    return None, str(err)
  return normalized_entropy(traces["attention"]).round(4).tolist(), ""
