"""python -m export RUN_DIR BUNDLE_DIR: turn a trained run into a served bundle (and, with
--push-to-hub OWNER/NAME, publish it as a Hugging Face model repo that `python app.py --bundle
hf://OWNER/NAME` serves)."""

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
    p.add_argument("--captioner", type=Path, default=None,
                   help="a folder written by `python -m training.train_captioner`: adds the "
                        "caption decoder and its scores")
    p.add_argument("--generator", type=Path, default=None,
                   help="a folder written by `python -m training.train_generator`: adds the "
                        "text-to-image generator and its scores")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME[@BRANCH]", default=None,
                   help="after the export, upload the bundle to this Hugging Face model repo "
                        "(created if missing; token from $HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true",
                   help="with --push-to-hub: create the repo private")
    args = p.parse_args(argv)
    if args.private and not args.push_to_hub:
        p.error("--private needs --push-to-hub")
    if args.push_to_hub:  # a typo fails now, not after the export
        from mmdemo.hub import SCHEME, HubError, parse_spec

        try:
            parse_spec(SCHEME + args.push_to_hub.removeprefix(SCHEME))
        except HubError:
            p.error(f"--push-to-hub {args.push_to_hub!r}: expected OWNER/NAME[@BRANCH]")
    from export.onnx import ExportError, export_bundle

    try:
        out = export_bundle(args.run_dir, args.bundle_dir, args.data, args.split, args.fusion,
                            captioner_dir=args.captioner, generator_dir=args.generator)
    except (FileNotFoundError, ValueError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.push_to_hub:
        from export.hub import PushError, push_bundle
        from mmdemo.bundle import BundleError

        try:
            url = push_bundle(out, args.push_to_hub, private=args.private)
        except (BundleError, PushError, ValueError) as e:
            print(f"error: the bundle is at {out}, but pushing it failed: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"pushed {out} to {args.push_to_hub}: {url}", flush=True)
    return out


if __name__ == "__main__":
    main()
