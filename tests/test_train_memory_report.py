"""--mode=memory_report on CPU: the compiled step's memory analysis is complete and consistent."""

import jax

from neon_qtg_jax.config import default_config, validate
from neon_qtg_jax.training import memory_report
from neon_qtg_jax.training import train_step as ts


def test_memory_analysis_of_the_real_step():
  c = default_config()
  c.model.update(vocab_size=128, embed_dim=16, num_layers=2, num_heads=2, max_seq_len=32, scan_layers=True,
                 remat="block")
  c.data.update(max_length=32, stride=16)
  c.eval.update(max_length=32, stride=16)
  c.training.update(batch_size=4, grad_accum_steps=2)
  validate(c)
  report = memory_report.analyze(c)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ts.abstract_train_state(c)))
  assert report.arguments >= state_bytes  # params, both AdamW moments and the batch are all arguments
  assert report.aliased >= 0.9 * state_bytes  # the donated state is updated in place
  assert report.temporaries > 0 and report.peak < report.device_bytes and report.fits
  text = memory_report.format_report(c, report)
  assert "XLA memory analysis" in text and "fits: yes" in text
