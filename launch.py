"""Entry point: python launch.py --config=configs/X.py [--config.a.b=value ...] --workdir=DIR --mode=MODE."""

from __future__ import annotations

import os
import sys

# A training process owns its GPU: let XLA's allocator take 95% of it rather than the default 75%
# (the 7b step needs more than 75% of an H200). An explicit setting in the environment wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
# --target compiles with XLA's compile-only GPU client; the CUDA plugin registers it only when it
# does not probe for a driver, so keep JAX on the CPU (nothing runs on a compile target anyway).
if any(arg.startswith("--target") for arg in sys.argv[1:]):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from neon_qtg_jax import cli
from neon_qtg_jax.config import ConfigError, default_config, validate
from neon_qtg_jax.data.sources import DataError


def reject_unknown_overrides(argv: list[str]) -> None:
  """Exits naming any --config.<field> that is not in the schema (config_flags would raise a bare KeyError)."""
  schema = default_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    flag = arg.split("=")[0]
    node = schema
    for part in flag[len("--config."):].split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        sys.exit(f"error: {flag}: unknown config field (not in the schema of neon_qtg_jax.config)")
      node = node[part]


# config_flags applies --config.* overrides while the flag is defined, so check them first.
reject_unknown_overrides(sys.argv)
_CONFIG = config_flags.DEFINE_config_file("config", "configs/neon_qtg_tiny.py", "Config file (ml-collections).",
                                          lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", sorted(cli.MODES), "What to run.")
_WORKDIR = flags.DEFINE_string("workdir", cli.RunArgs.workdir, "Run directory: checkpoints, logs, samples.")
_RESUME_FROM = flags.DEFINE_string("resume_from", "", "Train: resume from a step, 'best', 'latest' or a path.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "Eval/generate: a step, 'best', 'latest' or a path.")
_INFO_FORMAT = flags.DEFINE_enum("info_format", "text", ["text", "json"], "Info mode output format.")
_PROMPT = flags.DEFINE_string("prompt", "", "Generate: one prompt.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", "", "Generate: a file with one prompt per line.")
_EVAL_DATA = flags.DEFINE_string("eval_data", "", "Eval: a JSONL or text file; empty: the validation split.")
_TARGET = flags.DEFINE_string("target", "", "memory_test: compile for NAME:DEVICES, e.g. h200:1 or h200:8 "
                              "(8 per host); empty: the local devices.")
_OUTPUT = flags.DEFINE_string("output", "", "Result file; empty: a default under the workdir.")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax narrates every restore at INFO and WARNING
  config = _CONFIG.value
  try:
    validate(config)
  except ConfigError as err:
    print(f"error: {err} (config file {flags.FLAGS['config'].config_filename})", file=sys.stderr)
    return 2
  args = cli.RunArgs(workdir=_WORKDIR.value, resume_from=_RESUME_FROM.value, checkpoint=_CHECKPOINT.value,
                     info_format=_INFO_FORMAT.value, prompt=_PROMPT.value, prompts_file=_PROMPTS_FILE.value,
                     eval_data=_EVAL_DATA.value, output=_OUTPUT.value, target=_TARGET.value)
  try:
    return cli.mode_function(_MODE.value)(config, args) or 0
  except (FileNotFoundError, DataError) as err:  # a missing checkpoint or unusable data: one clear line
    print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  app.run(main)
