"""python -m export RUN_DIR BUNDLE_DIR: turn a trained run into a served bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("run_dir", type=Path, help="a folder written by `python -m training`")
    p.add_argument("bundle_dir", type=Path, help="where to write the bundle (replaced whole)")
    p.add_argument("--data", default=None,
                   help="shapes-world folder for the gallery (default: the run's own data)")
    p.add_argument("--split", default="test", help="split to use as the gallery (default test)")
    p.add_argument("--fusion", type=Path, default=None,
                   help="a folder written by `python -m training.train_fusion`: adds its "
                        "fusion models and their ablation to the bundle")
    args = p.parse_args(argv)
    from export.onnx import ExportError, export_bundle

    try:
        return export_bundle(args.run_dir, args.bundle_dir, args.data, args.split, args.fusion)
    except (FileNotFoundError, ValueError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
