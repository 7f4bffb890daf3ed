"""Your own images in a bundle, from the command line.

    python -m mmdemo.index add --bundle B PATH [PATH ...] [--captions CAPTIONS.jsonl]
    python -m mmdemo.index remove --bundle B ID [ID ...]
    python -m mmdemo.index list --bundle B [--added]
    python -m mmdemo.index repair --bundle B


PATH is an image file, a folder (searched recursively) or a zip file. Captions come from a
same-named .txt file beside each image (one caption a line) or from a JSONL file of
{"file": "cat.jpg", "captions": ["a cat on a sofa"]}. The bundle is changed in place, safely:
a kill at any moment leaves it as it was before or after, never a mix. Ids are never given
twice. `remove` takes any item, the bundle's own images included (the app removes only images
users added). `repair` makes a bundle whose gallery and indexes disagree (as an older mmdemo
could leave one) consistent again: see `mmdemo.store.repair`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from mmdemo import store
from mmdemo.bundle import BundleError
from mmdemo.engine import Engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmdemo.index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="embed images and add them to the gallery and indexes")
    a.add_argument("--bundle", type=Path, required=True)
    a.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    a.add_argument("--captions", type=Path, help="JSONL of {file, captions}")
    r = sub.add_parser("remove", help="take gallery items out by id")
    r.add_argument("--bundle", type=Path, required=True)
    r.add_argument("ids", nargs="+", metavar="ID")
    ls = sub.add_parser("list", help="gallery items, one a line: id, file, first caption")
    ls.add_argument("--bundle", type=Path, required=True)
    ls.add_argument("--added", action="store_true", help="only images added by a user")
    rp = sub.add_parser("repair", help="make the gallery and both indexes agree again")
    rp.add_argument("--bundle", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "repair":
            return _repair(args.bundle)
        engine = Engine.load(args.bundle)
        if args.command == "add":
            if args.captions and not args.captions.is_file():
                p.error(f"--captions {args.captions}: no such file")
            uploads, skipped = store.collect(args.paths, args.captions)
            with tqdm(total=len(uploads), desc="indexing", unit="img") as bar:
                added = store.add(engine, uploads,
                                  lambda done, total: bar.update(done - bar.n))
            for name, why in skipped + added.skipped:
                print(f"skipped {name}: {why}", file=sys.stderr)
            if added.ids:
                print(f"added {len(added.ids)} image(s) to {args.bundle} as ids "
                      f"{added.ids[0]}–{added.ids[-1]}; the gallery holds {len(engine.gallery)}")
            else:
                print("nothing was added", file=sys.stderr)
            return 0 if added.ids or not (skipped or added.skipped) else 1
        if args.command == "remove":
            ids = store.remove(engine, store.parse_ids(" ".join(args.ids)), shipped=True)
            print(f"removed {len(ids)} item(s); the gallery holds {len(engine.gallery)}")
            return 0
        for i, it in sorted(engine.gallery.items()):
            if not args.added or "source" in it:
                first = it["captions"][0] if it["captions"] else ""
                print(f"{i}\t{store.printable(it.get('source', it['file']))}\t"
                      f"{store.printable(first)}")
        return 0
    except (BundleError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _repair(bundle: Path) -> int:
    try:
        Engine.load(bundle)
        print(f"{bundle} is consistent: nothing to repair")
        return 0
    except BundleError as e:
        print(f"repairing: {e}", file=sys.stderr)
    report = store.repair(Engine.load(bundle, gallery=False))
    dropped = report["dropped"]
    print(f"repaired {bundle}: the gallery holds {report['items']} images; "
          f"{report['embedded_again']['images']} images and "
          f"{report['embedded_again']['captions']} captions embedded again; "
          + (f"{len(dropped)} dropped for a missing or damaged thumbnail (ids "
             f"{', '.join(map(str, dropped[:20]))})" if dropped else "none dropped"))
    Engine.load(bundle)  # every hash and count holds again
    return 0


if __name__ == "__main__":
    sys.exit(main())
