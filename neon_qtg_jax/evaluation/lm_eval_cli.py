"""lm_eval's command line with the "neon_qtg" model registered (evaluation/harness.py): neon-qtg-lm-eval."""

from __future__ import annotations


def main() -> None:
  import neon_qtg_jax.evaluation.harness  # noqa: F401 - registers "neon_qtg"
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == "__main__":
  main()
