"""Entry point: python launch.py --config=configs/X.py [--config.a.b=value ...] --workdir=DIR --mode=MODE."""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback

# A training process owns its GPU: let XLA's allocator take 95% of it rather than the default 75%
# (the 7b step needs more than 75% of an H200). An explicit setting in the environment wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
# --target compiles with XLA's compile-only GPU client; the CUDA plugin registers it only when it
# does not probe for a driver, so keep JAX on the CPU (nothing runs on a compile target anyway).
# Without an NVIDIA driver, importing neon_qtg_jax (below, before jax) sets the CPU too.
if any(arg.startswith("--target") for arg in sys.argv[1:]):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from neon_qtg_jax import cli
from neon_qtg_jax.config import ConfigError, default_config, validate
from neon_qtg_jax.model import attention as _attention_kinds  # noqa: F401  registers model.attention's names
from neon_qtg_jax.data.sources import DataError
from neon_qtg_jax.parallel import distributed
from neon_qtg_jax.checkpoint.errors import (BackupError, CheckpointMismatchError, CheckpointSaveError,
                                           CheckpointUnreadableError)
from neon_qtg_jax.training.workdir_lock import WorkdirError


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
        print(f"error: {flag}: unknown config field (not in the schema of neon_qtg_jax.config)", file=sys.stderr)
        sys.exit(2)
      node = node[part]


def check_config_file(argv: list[str], default: str) -> None:
  """Exits 2 with one line when the --config file is missing or fails to load (config_flags would print a traceback)."""
  path = default
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  path, *config_args = path.split(":")  # config_flags' "file.py:argument" form
  if not os.path.isfile(path):
    print(f"error: config file {path}: not found", file=sys.stderr)
    sys.exit(2)
  try:
    spec = importlib.util.spec_from_file_location("_launch_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise AttributeError("defines no get_config()")
    module.get_config(*config_args)
  except Exception as err:  # any error in the user's file: name it, its line and the reason
    line = next((f.lineno for f in reversed(traceback.extract_tb(err.__traceback__)) if f.filename == path),
                getattr(err, "lineno", None))
    print(f"error: config file {path}{f', line {line}' if line else ''}: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(2)


# config_flags applies --config.* overrides while the flag is defined, so check them first.
check_config_file(sys.argv, "configs/neon_qtg_tiny.py")
reject_unknown_overrides(sys.argv)
_CONFIG = config_flags.DEFINE_config_file("config", "configs/neon_qtg_tiny.py", "Config file (ml-collections).",
                                          lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", sorted(cli.MODES), "What to run.")
_WORKDIR = flags.DEFINE_string("workdir", cli.RunArgs.workdir, "Run directory: checkpoints, logs, samples.")
_RESUME_FROM = flags.DEFINE_string("resume_from", "", "Train: a step, 'best', 'latest', 'backup' or a path.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "Eval/generate/serve: a step, 'best', 'latest', a path or a URL.")
_INFO_FORMAT = flags.DEFINE_enum("info_format", "text", ["text", "json"], "Info mode output format.")
_PROMPT = flags.DEFINE_string("prompt", "", "Generate: one prompt.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", "", "Generate: a file with one prompt per line.")
_EVAL_DATA = flags.DEFINE_string("eval_data", "", "Eval: a JSONL or text file; empty: the split --eval_split.")
_EVAL_SPLIT = flags.DEFINE_enum("eval_split", "val", ["val", "tune"],
                                "Eval: the prepared split to score (tune: needs data.tune_fraction > 0).")
_TARGET = flags.DEFINE_string("target", "", "memory_report: compile for NAME:DEVICES, e.g. h200:1 or h200:8 "
                              "(8 per host); empty: the local devices.")
_HOST = flags.DEFINE_string("host", cli.RunArgs.host, "Serve: the address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", cli.RunArgs.port, "Serve: the TCP port.")
_OUTPUT = flags.DEFINE_string("output", "", "Result file; empty: a default under the workdir.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Eval: replace an earlier result of the same name.")
_VERIFY = flags.DEFINE_bool("verify", False, "Prepare: read every data file against the manifest's checksums.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "Multi-process: host:port of process 0 "
                                   "(else from SLURM, Open MPI or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process: how many processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's rank, 0..num_processes-1.")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax narrates every restore at INFO and WARNING
  try:  # first: joining the other processes must precede any use of a JAX backend
    distributed.initialize(distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value))
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  config = _CONFIG.value
  try:
    validate(config)
  except ConfigError as err:
    print(f"error: {err} (config file {flags.FLAGS['config'].config_filename})", file=sys.stderr)
    return 2
  args = cli.RunArgs(workdir=_WORKDIR.value, resume_from=_RESUME_FROM.value, checkpoint=_CHECKPOINT.value,
                     info_format=_INFO_FORMAT.value, prompt=_PROMPT.value, prompts_file=_PROMPTS_FILE.value,
                     eval_data=_EVAL_DATA.value, eval_split=_EVAL_SPLIT.value, output=_OUTPUT.value,
                     overwrite=_OVERWRITE.value, verify=_VERIFY.value, target=_TARGET.value,
                     host=_HOST.value, port=_PORT.value)
  # A missing checkpoint, an existing result, unusable data, a failed save, a checkpoint of another model
  # shape or a bad mesh: one clear line.
  try:
    return cli.mode_function(_MODE.value)(config, args) or 0
  except (FileNotFoundError, FileExistsError, DataError, CheckpointSaveError, CheckpointMismatchError,
          CheckpointUnreadableError, ConfigError, BackupError, WorkdirError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a value that does not parse (--config.training.lr=abc) or an unknown flag is one
  line and exit 2, like every config error (absl exits 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
