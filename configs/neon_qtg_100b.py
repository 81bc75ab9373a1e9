"""NEON-QTG-100B: d=8192, 53 layers (1.01e11 parameters), 8192-token windows, on 8 nodes of 8 GPUs.

Its fp32 training state (params, gradients, AdamW moments: 16 bytes per parameter) is 1.6 TB,
so it is sharded over all 64 GPUs: tensor parallel (4) and FSDP (2) inside each node, FSDP
across the 8 nodes (parallel.dcn_fsdp).
"""

from configs import neon_qtg_7b


def get_config():
  c = neon_qtg_7b.get_config()
  c.name = "neon_qtg_100b"
  c.model.embed_dim = 8192
  c.model.num_layers = 53
  c.model.num_heads = 64
  c.model.max_seq_len = 8192
  # 16 rows per microbatch: one per (data x fsdp) = 16 batch shards; 128 rows (1M tokens) per step.
  c.training.batch_size = 16
  c.training.grad_accum_steps = 8
  c.data.max_length = 8192
  c.data.stride = 4096
  c.eval.max_length = 8192
  c.eval.stride = 4096
  c.parallel.data, c.parallel.fsdp, c.parallel.tensor = 1, 2, 4
  c.parallel.dcn_data, c.parallel.dcn_fsdp = 1, 8
  c.info.num_devices = 64
  return c
