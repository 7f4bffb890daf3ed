"""Your own images in a bundle: add them to the gallery and both indexes, take them out again,
and keep the bundle consistent on disk whatever happens.

A change is written as new files beside the old ones (thumbnails, `gallery.<gen>.json`,
`index_*.<gen>.bin` with their sidecars), flushed to disk, and then published by replacing
`manifest.json` in one rename: the manifest names the files of the current state and their
hashes. Killed at any moment, the bundle is the old state or the new one, never a mix; the files
of an unfinished change are unreferenced and removed by the next change.

Nothing here imports torch: the images are embedded with the bundle's ONNX encoders.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mmdemo import settings
from mmdemo.bundle import MANIFEST, THUMBNAIL, fsync_path, sha256_file
from mmdemo.preprocess import ImageError, open_image

if TYPE_CHECKING:
    from mmdemo.engine import Engine

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
MAX_FILE_BYTES = 50 << 20  # one image file
MAX_ZIP_MEMBERS = 10_000
MAX_ZIP_BYTES = 2 << 30  # uncompressed, all members together


@dataclass
class Upload:
    """One image to add: a name for messages, its file bytes, and its captions (maybe none)."""

    name: str
    data: bytes
    captions: list[str] = field(default_factory=list)

    @property
    def filename(self) -> str:
        """The file's own name, without folders or the zip it came from."""
        return Path(self.name.rsplit(":", 1)[-1]).name


@dataclass
class Added:
    ids: list[int]  # new gallery ids, in the order of the uploads that were added
    skipped: list[tuple[str, str]]  # (name, why) of uploads that were not added


# ----------------------------------------------------------------------------- reading inputs


def _read_captions_jsonl(path: Path) -> dict[str, list[str]]:
    """{"file": "cat.jpg", "captions": ["...", ...]} (or "caption": "...") per line."""
    out: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            caps = row.get("captions", [row["caption"]] if "caption" in row else [])
            out[Path(str(row["file"])).name] = [str(c) for c in caps if str(c).strip()]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}, line {n}: expected a JSON object with 'file' and "
                             f"'captions' (or 'caption'): {e}") from None
    return out


def caption_lines(text: str) -> list[str]:
    """The captions of a caption file: one a line, blank lines skipped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _from_zip(path: Path) -> Iterator[Upload | tuple[str, str]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        yield (path.name, f"not a readable zip file ({e})")
        return
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > MAX_ZIP_MEMBERS:
            yield (path.name, f"holds {len(infos)} files; the limit is {MAX_ZIP_MEMBERS}")
            return
        if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
            yield (path.name, f"unpacks to more than {MAX_ZIP_BYTES >> 30} GB")
            return
        texts = {Path(i.filename).with_suffix("").as_posix(): i for i in infos
                 if i.filename.lower().endswith(".txt")}
        for info in infos:  # members are read into memory, never extracted to disk
            name = f"{path.name}:{info.filename}"
            if Path(info.filename).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if info.file_size > MAX_FILE_BYTES:
                yield (name, f"is {info.file_size >> 20} MB; the limit is "
                             f"{MAX_FILE_BYTES >> 20} MB")
                continue
            try:
                data = zf.read(info)
                side = texts.get(Path(info.filename).with_suffix("").as_posix())
                caps = caption_lines(zf.read(side).decode("utf-8", "replace")) if side else []
            except (zipfile.BadZipFile, OSError, RuntimeError) as e:
                yield (name, f"could not be read from the zip ({e})")
                continue
            yield Upload(name, data, caps)


def _from_file(path: Path, name: str | None = None) -> Upload | tuple[str, str]:
    name = name or path.name
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        return (name, f"is {size >> 20} MB; the limit is {MAX_FILE_BYTES >> 20} MB")
    side = path.with_suffix(".txt")
    caps = (caption_lines(side.read_text(encoding="utf-8", errors="replace"))
            if side.is_file() else [])
    return Upload(name, path.read_bytes(), caps)


def collect(paths: list[Path | str], captions: Path | str | None = None
            ) -> tuple[list[Upload], list[tuple[str, str]]]:
    """Uploads from files, folders (searched recursively for images) and zip files.

    Captions come from a same-named .txt file beside each image (one caption a line) or, for
    every image it names, from the JSONL file `captions`. Returns the uploads and (name, why)
    for what was skipped.
    """
    table = _read_captions_jsonl(Path(captions)) if captions else {}
    uploads: list[Upload] = []
    skipped: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = [f for f in sorted(p.rglob("*"))
                     if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                skipped.append((str(p), "the folder holds no image files"))
            items = [_from_file(f, f.relative_to(p).as_posix()) for f in found]
        elif p.is_file() and p.suffix.lower() == ".zip":
            items = list(_from_zip(p))
        elif p.is_file():
            items = [_from_file(p)]
        else:
            items = [(str(p), "no such file or folder")]
        for it in items:
            if isinstance(it, Upload):
                it.captions = table.get(it.filename, it.captions)
                uploads.append(it)
            else:
                skipped.append(it)
    return uploads, skipped


# ----------------------------------------------------------------------------- writing


def _write_bytes(path: Path, data: bytes) -> None:
    """Write, flush to disk, then rename into place: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _thumbnail(image) -> bytes:
    im = image.copy()
    im.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _clean_captions(engine: Engine, captions: list[str]) -> list[str]:
    out = []
    for c in captions:
        try:
            out.append(engine.read_text(c)[0])
        except ValueError:
            continue  # blank or control characters only
    return out


@contextlib.contextmanager
def _writing(engine: Engine) -> Iterator[None]:
    """One writer at a time, in this process and across processes (an fcntl lock on
    `<bundle>/.lock`); if another process changed the bundle since this engine read it, the
    engine reads the new state first, so no change is lost."""
    with engine._write_lock, open(engine.root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            on_disk = json.loads((engine.root / MANIFEST).read_text())
            if on_disk.get("generation", 0) != engine.manifest.get("generation", 0):
                engine.reload()
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def add(engine: Engine, uploads: list[Upload],
        progress: Callable[[int, int], None] | None = None,
        batch: int = settings.ENCODE_BATCH) -> Added:
    """Embed `uploads` with the bundle's encoders, add them to the gallery and both indexes
    (searchable at once) and publish the new state of the bundle on disk."""
    with _writing(engine):
        next_id = max(engine.gallery, default=-1) + 1
        next_cap = max(engine.captions, default=-1) + 1
        ids: list[int] = []
        skipped: list[tuple[str, str]] = []
        new_files: list[str] = []
        done = 0
        for start in range(0, len(uploads), batch):
            chunk = uploads[start:start + batch]
            images, kept = [], []
            for up in chunk:
                try:
                    images.append(open_image(up.data, up.name))
                    kept.append(up)
                except ImageError as e:
                    skipped.append((up.name, str(e).removeprefix(up.name).strip()))
            if images:
                img_emb = engine.encode_images(images)
                items, cap_ids, cap_texts = [], [], []
                for up, im in zip(kept, images):
                    rel = f"gallery/{next_id}.png"
                    _write_bytes(engine.root / rel, _thumbnail(im))
                    new_files.append(rel)
                    caps = _clean_captions(engine, up.captions)
                    cids = list(range(next_cap, next_cap + len(caps)))
                    next_cap += len(caps)
                    items.append({"id": next_id, "file": rel, "caption_ids": cids,
                                  "captions": caps, "source": up.name})
                    cap_ids += cids
                    cap_texts += caps
                    ids.append(next_id)
                    next_id += 1
                # the gallery first, then the indexes: a search never finds an id it can't show
                for it in items:
                    engine.gallery[it["id"]] = it
                    for cid, text in zip(it["caption_ids"], it["captions"]):
                        engine.captions[cid] = (text, it["id"])
                engine.indexes["images"].add(img_emb, [it["id"] for it in items])
                if cap_texts:
                    engine.indexes["captions"].add(engine.encode_texts(cap_texts), cap_ids)
            done += len(chunk)
            if progress:
                progress(done, len(uploads))
        if ids:
            commit(engine, new_files)
        return Added(ids, skipped)


def remove(engine: Engine, ids) -> list[int]:
    """Take gallery items out of the indexes and the gallery, and publish the new state."""
    ids = [int(i) for i in ids]
    with _writing(engine):
        missing = [i for i in ids if i not in engine.gallery]
        if missing:
            raise ValueError(f"no gallery item with id {', '.join(map(str, missing[:10]))}")
        cap_ids = [c for i in ids for c in engine.gallery[i]["caption_ids"]]
        engine.indexes["images"].remove(ids)  # the indexes first: searches stop finding them
        if cap_ids:
            engine.indexes["captions"].remove(cap_ids)
        for i in ids:
            del engine.gallery[i]
        for c in cap_ids:
            del engine.captions[c]
        commit(engine, [])
        return ids


def commit(engine: Engine, new_files: list[str]) -> dict:
    """Write the engine's gallery and indexes as a new generation and publish its manifest."""
    root, old = engine.root, engine.manifest
    gen = int(old.get("generation", 0)) + 1
    files = dict(old["files"])
    manifest = json.loads(json.dumps(old))
    items = sorted(engine.gallery.values(), key=lambda it: it["id"])
    live = {it["file"] for it in items}
    for rel in [r for r in files if r.startswith("gallery/") and r not in live]:
        del files[rel]  # thumbnails of removed items
    files.pop(old["gallery"]["file"], None)
    gal_rel = f"gallery.{gen}.json"
    _write_bytes(root / gal_rel, json.dumps({"items": items}).encode())
    manifest["gallery"].update(file=gal_rel, count=len(items),
                               captions=sum(len(it["captions"]) for it in items))
    written = [gal_rel, *new_files]
    for name, info in old["indexes"].items():
        stem = info["file"].split(".")[0]
        rel = f"{stem}.{gen}.bin"
        engine.indexes[name].save(root / rel)
        fsync_path(root / rel)
        fsync_path(root / f"{rel}.json")
        files.pop(info["file"], None)
        files.pop(f"{info['file']}.json", None)
        manifest["indexes"][name].update(file=rel, count=len(engine.indexes[name]))
        written += [rel, f"{rel}.json"]
    for rel in written:
        files[rel] = sha256_file(root / rel)
    manifest["files"] = dict(sorted(files.items()))
    manifest["generation"] = gen
    fsync_path(root / "gallery")
    _write_bytes(root / MANIFEST, json.dumps(manifest, indent=2).encode())  # the commit point
    fsync_path(root)
    engine.manifest = manifest
    sweep(root, manifest)
    return manifest


def sweep(root: Path, manifest: dict) -> list[str]:
    """Remove gallery, index and thumbnail files that the manifest does not name: leftovers of
    an earlier state or of a change that was killed before it was published."""
    keep = set(manifest["files"])
    gone = []
    candidates = [*root.glob("gallery*.json"), *root.glob("index_*.bin"),
                  *root.glob("index_*.bin.json"), *(root / "gallery").glob("*"),
                  *root.glob(".*.tmp-*"), *(root / "gallery").glob(".*.tmp-*")]
    for p in candidates:
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in keep:
            p.unlink(missing_ok=True)
            gone.append(rel)
    return gone
