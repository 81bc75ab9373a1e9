"""Data validation report of a prepared directory: printed, and written as report.json and lengths.png.

  python tools/data_report.py --data_dir=data/stdlib
  python tools/data_report.py --data_dir=data/openwebtext_sp30k --output=owt_report.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neon_qtg_jax.data.manifest import Manifest
from neon_qtg_jax.data.report import format_report, write_report
from neon_qtg_jax.data.sources import DataError


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", required=True, help="a directory prepared by tools/prepare_data.py")
  p.add_argument("--output", default="", help="also copy report.json here")
  args = p.parse_args(argv)
  try:
    manifest = Manifest.load(args.data_dir)
  except DataError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  report = write_report(manifest, progress=False)
  print(format_report(report))
  print(f"written: {Path(args.data_dir) / 'report.json'}, {Path(args.data_dir) / 'lengths.png'}")
  if args.output:
    shutil.copyfile(Path(args.data_dir) / "report.json", args.output)
  return 0


if __name__ == "__main__":
  sys.exit(main())
