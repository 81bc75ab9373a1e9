"""Runs a config's data.filters pass (data/filters.py) on this machine or submits it to a SLURM cluster.

Preparation (`launch.py --mode=prepare`) runs the same pass itself; this tool is for running it
apart, above all on a cluster: every stage becomes a datatrove job array that waits for the one
before. When the jobs are done, `launch.py --mode=prepare` with the same config finds their
completion markers in data_dir/filter and goes straight to tokenizing the kept documents.

  python tools/filter_data.py --config=configs/neon_qtg_7b.py --executor=slurm --partition=cpu \\
      --time=08:00:00 --env_command='source /shared/venv/bin/activate'
  python tools/filter_data.py --config=configs/neon_qtg_tiny.py --config.data.source=jsonl \\
      --config.data.paths=data/web.jsonl --config.data.filters=fineweb --config.data.data_dir=data/web
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags
from ml_collections import config_flags

from neon_qtg_jax.config import ConfigError, validate
from neon_qtg_jax.data import filters, sources

_CONFIG = config_flags.DEFINE_config_file("config", "configs/neon_qtg_tiny.py", "Config file.", lock_config=True)
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "slurm"], "datatrove executor.")
_PROCESSES = flags.DEFINE_integer("num_processes", 0, "local: tasks at a time; 0: one per available core.")
_PARTITION = flags.DEFINE_string("partition", "", "slurm: partition.")
_TIME = flags.DEFINE_string("time", "08:00:00", "slurm: time limit of each task.")
_CPUS = flags.DEFINE_integer("cpus_per_task", 1, "slurm: CPUs per task.")
_MEM = flags.DEFINE_integer("mem_per_cpu_gb", 2, "slurm: memory per CPU in GB.")
_ENV = flags.DEFINE_string("env_command", "", "slurm: shell line each job runs first (e.g. activate a venv).")
_SRUN = flags.DEFINE_bool("srun", True, "slurm: start each task with srun.")


def main(argv: list[str]) -> int:
  del argv
  config = _CONFIG.value
  try:
    validate(config)
    if not filters.parse_filters(config.data.filters):
      raise ConfigError("config field 'data.filters' = '': nothing to run; set it to 'fineweb' or a list of steps")
    if _EXECUTOR.value == "slurm":
      if not _PARTITION.value:
        raise ConfigError("--partition: required with --executor=slurm")
      ids = filters.submit_to_slurm(config, partition=_PARTITION.value, time_limit=_TIME.value,
                                    cpus_per_task=_CPUS.value, mem_per_cpu_gb=_MEM.value,
                                    env_command=_ENV.value or None, with_srun=_SRUN.value)
      print(f"submitted {len(ids)} stage(s) as SLURM jobs {ids}; outputs and completion markers under "
            f"{filters.filter_root(config.data.data_dir)}; when they finish, run launch.py --mode=prepare "
            f"with the same config to tokenize the kept documents")
      return 0
    issues = sources.Issues()
    files = sources.source_files(config.data.source, config.data.paths, issues)
    filtered, _ = filters.filter_corpus(config, files, issues, num_processes=_PROCESSES.value or None)
    print(f"kept documents in {filtered.data.paths}; summary {filters.filter_root(config.data.data_dir)}/"
          f"{filters.SUMMARY_FILE}\n{issues.summary()}")
  except (ConfigError, sources.DataError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
