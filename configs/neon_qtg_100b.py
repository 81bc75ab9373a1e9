"""NEON-QTG-100B: d=8192, 80 layers, 8192-token windows, for 8 GPUs."""

from configs import neon_qtg_7b


def get_config():
  c = neon_qtg_7b.get_config()
  c.name = "neon_qtg_100b"
  c.model.embed_dim = 8192
  c.model.num_layers = 80
  c.model.num_heads = 64
  c.model.max_seq_len = 8192
  c.training.batch_size = 2
  c.training.grad_accum_steps = 16
  c.data.max_length = 8192
  c.data.stride = 4096
  c.eval.max_length = 8192
  c.eval.stride = 4096
  c.info.num_devices = 8
  return c
