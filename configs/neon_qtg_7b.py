"""NEON-QTG-7B: the seed plan, OpenWebText on one H200 for 200k steps (about 6.7e9 parameters)."""

from neon_qtg_jax.config import default_config


def get_config():
  c = default_config()
  c.name = "neon_qtg_7b"
  m = c.model
  m.vocab_size = 30000
  m.embed_dim = 3072
  m.num_layers = 24
  m.num_heads = 24
  m.max_seq_len = 2048
  m.dropout = 0.1
  m.dtype = "bfloat16"
  m.remat = "block"
  m.scan_layers = True

  t = c.training
  t.lr = 5e-5
  t.warmup_steps = 2000
  t.total_steps = 200000
  t.weight_decay = 0.01
  t.max_grad_norm = 1.0
  t.mu_dtype = "bfloat16"  # 12.5 GiB less on the H200 (docs/PERFORMANCE.md, "7b on one H200")
  t.batch_size = 4
  t.grad_accum_steps = 8
  t.log_steps = 10
  t.eval_steps = 2000
  t.eval_batches = 50
  t.save_steps = 5000
  t.save_interval_minutes = 10.0
  t.keep_checkpoints = 3
  t.sample_steps = 2000

  d = c.data
  d.source = "openwebtext"
  d.paths = "data/openwebtext/subsets/*.tar"
  d.data_dir = "data/openwebtext_sp30k"
  d.max_length = 2048
  d.stride = 1024
  d.val_fraction = 0.005
  d.tokenizer_sample_sentences = 2000000
  d.num_workers = 8
  d.filters = "fineweb"     # Gopher, C4 and FineWeb quality rules, length, exact and MinHash dedup (docs/DATA.md)
  d.filter_tasks = 32       # one datatrove task per core of the seed's 32-core machine

  c.sampling.max_new_tokens = 256
  c.sampling.prompts = ("The meaning of life is", "In a shocking finding, scientists", "def fibonacci(n):")
  c.inference.weight_dtype = "bfloat16"  # --config.inference.weight_dtype=int8 for 15 GB (docs/PERFORMANCE.md)
  c.eval.max_length = 2048
  c.eval.stride = 1024
  return c
