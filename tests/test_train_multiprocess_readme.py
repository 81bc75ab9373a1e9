"""README.md's "Several processes and hosts" commands, run as written (the script, and the by-hand commands
one per process), to their last step: the path users take, which tests/test_train_multiprocess.py (a smaller
model) did not cover when two processes of the tiny config hung in their initialisation.

The commands are read from README.md; the tests change only the workdir, the port, the data directory (one
prepared copy) and the number of steps.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.test_train_multiprocess import env, free_port
from tests.test_train_resume import ROOT

TIMEOUT = 540
STEPS = ("--config.training.total_steps=3", "--config.training.warmup_steps=1", "--config.training.max_train_minutes=0",
         "--config.training.eval_batches=1", "--config.sampling.max_new_tokens=4",
         "--config.training.collective_timeout_minutes=3")  # a hang fails in minutes, with the stalled step


def readme_commands() -> tuple[list[str], list[str], list[str]]:
  """(the script's command, the by-hand prepare command, the by-hand train command) from README.md."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    section = f.read().split("## Several processes and hosts", 1)[1].split("\n## ", 1)[0]
  blocks = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)]
  lines = [line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]
  script = next(shlex.split(line) for line in lines if line.startswith("tools/launch_multiprocess.sh local"))
  prepare = next(shlex.split(line) for line in lines if "--mode=prepare" in line)
  train = next(shlex.split(line) for line in lines if "--process_id=0" in line)
  return script, prepare, train


def with_values(words: list[str], **values: str) -> list[str]:
  """The command with each `--name=...` flag named in values replaced (a dotted name as name__sub)."""
  out = []
  for word in words:
    name = word.split("=", 1)[0].lstrip("-").replace(".", "__")
    out.append(f"{word.split('=', 1)[0]}={values[name]}" if word.startswith("--") and name in values else word)
  return out


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
  """`A=1 B=2 python ...` -> ({A: 1, B: 2}, [python, ...]); python is this interpreter."""
  assignments = {}
  while "=" in words[0] and not words[0].startswith("-"):
    name, value = words.pop(0).split("=", 1)
    assignments[name] = value
  return assignments, [sys.executable if w in ("python", "python3") else w for w in words]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
  """The README's prepare command, once, into a data directory the runs share."""
  _, prepare, _ = readme_commands()
  path = str(tmp_path_factory.mktemp("readme_data") / "stdlib")
  _, words = split_env(with_values(prepare, workdir=str(tmp_path_factory.mktemp("prepare"))))
  result = subprocess.run(words + [f"--config.data.data_dir={path}"], cwd=ROOT, env=env(1), capture_output=True,
                          text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stdout + result.stderr
  return path


def assert_trained_to_the_end(workdir: str, outputs: str) -> None:
  with open(os.path.join(workdir, "outputs", "logs", "training.log"), encoding="utf-8") as f:
    log = f.read()
  assert "stopped at step 3 (finished)" in log, outputs + log
  assert "over 4 devices in 2 process(es)" in log, log


def test_the_readme_script_trains_two_processes_to_the_last_step(data, tmp_path):
  script, _, _ = readme_commands()
  assert "--config.parallel.fsdp=2" in script and "--config.parallel.tensor=2" in script  # the README's mesh
  workdir = str(tmp_path / "two_procs")
  words = with_values(script, workdir=workdir) + [f"--config.data.data_dir={data}", *STEPS]
  result = subprocess.run(["bash", *words], cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stdout + result.stderr
  assert_trained_to_the_end(workdir, result.stderr)


@pytest.mark.slow  # CI runs the README's script (the same two processes); this checks the by-hand commands
def test_the_readme_commands_by_hand_train_two_processes_to_the_last_step(data, tmp_path):
  _, _, train = readme_commands()
  assert not any(w.startswith("--config.parallel") for w in train)  # the default mesh: fsdp over all devices
  workdir = str(tmp_path / "by_hand")
  port = free_port()
  procs = []
  for process_id in range(2):
    assignments, words = split_env(with_values(train, workdir=workdir, coordinator_address=f"127.0.0.1:{port}",
                                               process_id=str(process_id)))
    procs.append(subprocess.Popen(words + [f"--config.data.data_dir={data}", *STEPS], cwd=ROOT,
                                  env=env(1) | assignments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert_trained_to_the_end(workdir, outputs[0])
  assert "mesh data=1 x fsdp=4 x tensor=1" in outputs[0]
