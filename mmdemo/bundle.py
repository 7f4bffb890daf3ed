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
THUMBNAIL = 256  # longest side of a gallery thumbnail (export and mmdemo.store write them)


# Files of the gallery and its indexes (gallery*.json, gallery/*, index_*): the part of a bundle
# that adding and removing images rewrites, and `python -m mmdemo.index repair` restores.
STORE_PREFIXES = ("gallery", "index_")


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


def read_manifest(root: Path | str, verify: bool = True, known: dict | None = None,
                  store: bool = True) -> dict:
    """The manifest of a bundle, after checking its format version and (by default) every hash.

    `known`: the files of a manifest checked before; entries with the same hash are not read
    again. `store=False` leaves out the gallery and index files (for a repair)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        recover_dir(root)  # a swap killed between its renames leaves the old bundle aside
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
            if (known and known.get(rel) == want) or (not store and
                                                       rel.startswith(STORE_PREFIXES)):
                continue
            p = root / rel
            if not p.is_file():
                raise BundleError(f"{root}: {rel} is listed in the manifest but missing")
            got = sha256_file(p)
            if got != want:
                raise BundleError(f"{root}: {rel} has sha256 {got[:12]}..., the manifest says "
                                  f"{want[:12]}...; the file was changed or corrupted")
    return manifest


def _old(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def recover_dir(dest: Path | str) -> None:
    """Finish or undo a swap that `atomic_dir` was killed in the middle of.

    The swap is two renames (dest -> .dest.old, tmp -> dest) and a removal. Killed between the
    renames, dest is missing and .dest.old is the previous state: it is put back. Killed during
    the removal, .dest.old is a leftover and goes. Temporaries of writers that are no longer
    running (.dest.tmp-PID-*) go too: they were never renamed into place.
    """
    dest = Path(dest).absolute()
    old = _old(dest)
    if old.exists():
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, dest)
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = tmp.name.split("-")[1] if tmp.name.count("-") >= 2 else ""
        if not (pid.isdigit() and _running(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; on success it replaces `dest` by rename.

    On an exception the temporary directory is removed and `dest` is left as it was. Killed at
    any moment (SIGKILL, power), the next `recover_dir(dest)` (which every writer and reader
    calls first) leaves either the old or the new directory, never a mix.
    """
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # as mkdir would make it, not mkdtemp's 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    old = _old(dest)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_path(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under root to disk, so a rename never publishes unwritten data."""
    for p in root.rglob("*"):
        fsync_path(p)
    fsync_path(root)
