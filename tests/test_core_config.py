"""Every shipped config validates; each kind of bad value is rejected naming the field."""

import importlib
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from neon_qtg_jax.config import ConfigError, default_config, validate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("neon_qtg_*.py"))


def test_all_configs_are_found():
  assert set(CONFIGS) >= {"neon_qtg_tiny", "neon_qtg_7b", "neon_qtg_30b", "neon_qtg_100b"}


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
  validate(importlib.import_module(f"configs.{name}").get_config())


def test_seven_b_has_the_seed_values():
  c = importlib.import_module("configs.neon_qtg_7b").get_config()
  assert (c.model.vocab_size, c.model.embed_dim, c.model.num_layers, c.model.num_heads, c.model.max_seq_len) == (
      30000, 3072, 24, 24, 2048)
  assert (c.training.batch_size, c.training.grad_accum_steps, c.training.lr, c.training.warmup_steps,
          c.training.total_steps, c.training.max_grad_norm) == (4, 8, 5e-5, 2000, 200000, 1.0)
  assert (c.training.save_steps, c.training.save_interval_minutes, c.training.eval_steps) == (5000, 10.0, 2000)
  assert (c.data.max_length, c.data.stride) == (2048, 1024)
  assert (c.sampling.temperature, c.sampling.top_k, c.sampling.top_p) == (0.8, 50, 0.9)


def _set(config, path, value):
  *parents, leaf = path.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


@pytest.mark.parametrize("path,value,needle", [
    ("model.embed_dim", 66, "divisible by model.num_heads"),
    ("training.lr", -1e-3, "must be > 0"),
    ("data.max_length", 4096, "longer than model.max_seq_len"),
    ("eval.max_length", 4096, "longer than model.max_seq_len"),
    ("model.attention", "flash", "must be one of"),
    ("model.dropout", 1.0, "[0, 1)"),
    ("training.beta2", 1.0, "must be < 1"),
    ("training.warmup_steps", -1, "must be >= 0"),
    ("sampling.top_p", 0.0, "(0, 1]"),
    ("data.stride", 1000, "<= data.max_length"),
    ("training.mu_dtype", "float16", "must be one of"),
])
def test_bad_values_are_rejected_naming_the_field(path, value, needle):
  config = default_config()
  _set(config, path, value)
  with pytest.raises(ConfigError) as err:
    validate(config)
  assert f"'{path}'" in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("path,value,needle", [
    ("model.num_layers", 2.5, "must be an integer"),
    ("model.topofilter", 1, "true or false"),
    ("training.lr", "fast", "finite number"),
])
def test_wrong_types_are_rejected(path, value, needle):
  # A config file may build its own (not type-safe) ConfigDict; validate still checks types.
  config = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
  _set(config, path, value)
  with pytest.raises(ConfigError, match=f"'{path}'.*{needle}"):
    validate(config)


def test_unknown_field_is_rejected():
  config = default_config()
  config.model.embed_size = 64
  with pytest.raises(ConfigError, match="'model.embed_size'.*unknown field"):
    validate(config)


def test_missing_field_is_rejected():
  config = default_config()
  del config.training["lr"]
  with pytest.raises(ConfigError, match="'training.lr'.*missing"):
    validate(config)


def _launch(*args):
  return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_launch_rejects_bad_values_before_any_work():
  result = _launch("--config=configs/neon_qtg_tiny.py", "--config.model.num_heads=5", "--mode=train",
                   "--workdir=/nonexistent/should/not/be/created")
  assert result.returncode == 2
  assert "model.embed_dim" in result.stderr and "num_heads=5" in result.stderr
  assert not Path("/nonexistent/should/not/be/created").exists()


@pytest.mark.parametrize("flag, expected", [
    ("--config.model.embed_size=64", "--config.model.embed_size: unknown config field"),
    ("--config.training.lr=abc", "--config.training.lr=abc: could not convert string to float: 'abc'"),
    ("--no_such_flag=1", "Unknown command line flag 'no_such_flag'"),
])
def test_launch_names_an_unknown_override_or_a_value_that_does_not_parse_in_one_line(flag, expected):
  result = _launch("--config=configs/neon_qtg_tiny.py", flag, "--mode=info")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().count("\n") == 0 and expected in result.stderr, result.stderr


@pytest.mark.parametrize("content, expected", [
    (None, "configs/missing.py: not found"),
    ("def get_config(:\n", "line 1: SyntaxError"),
    ("def get_config():\n  return 1 / 0\n", "line 2: ZeroDivisionError"),
    ("x = 1\n", "defines no get_config()"),
])
def test_launch_reports_a_missing_or_broken_config_file_in_one_line(tmp_path, content, expected):
  path = "configs/missing.py"
  if content is not None:
    path = str(tmp_path / "broken.py")
    Path(path).write_text(content)
  result = _launch(f"--config={path}", "--mode=info")
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0 and expected in result.stderr, result.stderr
