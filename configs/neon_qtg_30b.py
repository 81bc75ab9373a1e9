"""NEON-QTG-30B: d=5120, 40 layers, 4096-token windows, on one node of 8 GPUs (FSDP over all 8)."""

from configs import neon_qtg_7b


def get_config():
  c = neon_qtg_7b.get_config()
  c.name = "neon_qtg_30b"
  c.model.embed_dim = 5120
  c.model.num_layers = 40
  c.model.num_heads = 40
  c.model.max_seq_len = 4096
  # 8 rows per microbatch: one per device (batch split over fsdp=8); 32 rows (131k tokens) per step.
  c.training.batch_size = 8
  c.training.grad_accum_steps = 4
  c.data.max_length = 4096
  c.data.stride = 2048
  c.eval.max_length = 4096
  c.eval.stride = 2048
  c.parallel.data, c.parallel.fsdp, c.parallel.tensor = 1, 8, 1
  c.info.num_devices = 8
  return c
