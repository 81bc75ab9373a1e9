"""Prepares a config's data directory: tokenizer, token shards, splits, manifest and report.

Same as `launch.py --mode=prepare`, with the number of tokenizing processes as a flag.

  python tools/prepare_data.py --config=configs/neon_qtg_tiny.py
  python tools/prepare_data.py --config=configs/neon_qtg_7b.py --config.data.paths='owt/subsets/*.tar'
  python tools/prepare_data.py --config=configs/neon_qtg_tiny.py --config.data.source=jsonl \\
      --config.data.paths=data/train.jsonl --config.data.data_dir=data/train_jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags
from ml_collections import config_flags

from neon_qtg_jax.config import ConfigError, validate
from neon_qtg_jax.data.filters import PreviewOnly
from neon_qtg_jax.data.prepare import prepare_dataset
from neon_qtg_jax.data.sources import DataError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/neon_qtg_tiny.py", "Config file.", lock_config=True)
_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Tokenizing processes; 0: one per available core.")


def main(argv: list[str]) -> int:
  del argv
  config = _CONFIG.value
  try:
    validate(config)
    manifest = prepare_dataset(config, num_processes=_PROCESSES.value or None)
  except PreviewOnly:
    return 0
  except (ConfigError, DataError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  print(f"{manifest.data_dir}: documents {manifest.documents}, tokens {manifest.tokens}, "
        f"{manifest.num_shards} shard(s); seconds per phase {manifest.timings}")
  return 0


if __name__ == "__main__":
  app.run(main)
