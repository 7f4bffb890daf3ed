"""The bundle: the directory that export writes and serving reads.

    bundle/
      manifest.json        format version, package versions, configs, metrics, sha256 of every file
      image_encoder.onnx   float32 (N, 3, S, S) -> float32 (N, D), L2-normalised
      text_encoder.onnx    int64 (N, L) ids, int64 (N, L) mask -> float32 (N, D), L2-normalised
      tokenizer.json       Hugging Face tokenizers format
      gallery.json         items: id, image file, captions with their ids
      gallery/*.png        thumbnails
      index_images.bin     hnswlib over image embeddings (+ .json sidecar)
      index_captions.bin   hnswlib over caption embeddings (+ .json sidecar)
      curves.png           training curves

It is written into a temporary directory beside its destination and renamed into place, and its
hashes are checked when it is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle is missing, from another format version, or does not match its hashes."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest, keyed by POSIX relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(root: Path, manifest: dict) -> dict:
    """Add format version and file hashes to `manifest` and write it as root/manifest.json."""
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": file_hashes(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))
    return manifest


def read_manifest(root: Path | str, verify: bool = True) -> dict:
    """The manifest of a bundle, after checking its format version and (by default) every hash."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{root} has bundle format version {version!r}; this mmdemo reads "
                          f"version {FORMAT_VERSION}. Re-export it with `python -m export`.")
    if verify:
        for rel, want in manifest.get("files", {}).items():
            p = root / rel
            if not p.is_file():
                raise BundleError(f"{root}: {rel} is listed in the manifest but missing")
            got = sha256_file(p)
            if got != want:
                raise BundleError(f"{root}: {rel} has sha256 {got[:12]}..., the manifest says "
                                  f"{want[:12]}...; the file was changed or corrupted")
    return manifest


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; on success it replaces `dest` by rename.

    On an exception the temporary directory is removed and `dest` is left as it was.
    """
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
