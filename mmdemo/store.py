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
import hashlib
import io
import json
import os
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mmdemo import settings
from mmdemo.bundle import MANIFEST, THUMBNAIL, BundleError, fsync_path, sha256_file
from mmdemo.preprocess import ImageError, declared_size, open_image, preprocess

if TYPE_CHECKING:
    from mmdemo.engine import Engine

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ico"}
MAX_FILE_BYTES = 20 << 20  # one image file, as Gradio's upload cap in app.py (MAX_UPLOAD)
MAX_ZIP_MEMBERS = 10_000  # files in one zip
MAX_ZIP_BYTES = 1 << 30  # the declared unpacked size of a zip's images together
MAX_ZIP_RATIO = 50  # unpacked / stored size of one member over 1 MB; PNG and JPEG are ~1
MAX_CAPTION_FILE_BYTES = 64 << 10  # one .txt of captions
MAX_CAPTIONS = 20  # captions of one image (COCO has 5)
MAX_JSONL_BYTES = 16 << 20  # a --captions JSONL file


class StoreError(ValueError):
    """A change to the gallery that cannot be made; the message says why, and nothing changed."""


def printable(name: str) -> str:
    """A file name safe to show on one line: control characters become '?'."""
    return "".join("?" if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c
                   for c in str(name))


@dataclass
class Upload:
    """One image to add: a name for messages, its file bytes (or a function that reads them
    when the image's turn comes, so a big upload is never held in memory whole) and its
    captions (or a function that reads them from a caption file)."""

    name: str
    data: bytes = b""
    captions: list[str] = field(default_factory=list)
    reader: Callable[[], bytes] | None = None  # reads the file's bytes; StoreError if it can't
    caption_reader: Callable[[], list[str]] | None = None  # StoreError if they are refused

    @property
    def filename(self) -> str:
        """The file's own name, without folders or the zip it came from."""
        return Path(self.name.rsplit(":", 1)[-1]).name

    def load(self) -> bytes:
        return self.reader() if self.reader is not None else self.data

    def load_captions(self) -> list[str]:
        return self.caption_reader() if self.caption_reader is not None else self.captions


@dataclass
class Limits:
    """What one request may add (None: no limit; the CLI sets none, the app the settings')."""

    images: int | None = None  # images in one request
    pixels: int | None = None  # pixels of all its images together, as their headers declare


@dataclass
class Added:
    ids: list[int]  # new gallery ids, in the order of the uploads that were added
    skipped: list[tuple[str, str]]  # (name, why) of uploads (or caption files) not added
    existing: dict[str, int] = field(default_factory=dict)  # name -> id already holding it


# ----------------------------------------------------------------------------- reading inputs


def caption_lines(text: str) -> list[str]:
    """The captions of a caption file: one a line, blank lines skipped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_caption_file(data: bytes, name: str) -> list[str]:
    """Captions from the bytes of a .txt file (UTF-8, one a line), or StoreError saying why
    the file is refused: too large, not UTF-8 text, binary, or more captions than allowed."""
    name = printable(name)
    if len(data) > MAX_CAPTION_FILE_BYTES:
        raise StoreError(f"is over {MAX_CAPTION_FILE_BYTES >> 10} KB; a caption file holds a "
                         "few lines of text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise StoreError("is not UTF-8 text; save the captions as UTF-8, one a line") from None
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text):
        raise StoreError("holds control characters or binary data, not caption text")
    lines = caption_lines(text)
    if len(lines) > MAX_CAPTIONS:
        raise StoreError(f"holds {len(lines)} captions; an image may have at most "
                         f"{MAX_CAPTIONS}")
    return lines


def read_caption_path(path: Path) -> list[str]:
    """Captions from a .txt file on disk (see read_caption_file), read no further than the
    limit."""
    return read_caption_file(_read_limited(path, MAX_CAPTION_FILE_BYTES, "a caption file"),
                             path.name)


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StoreError(f"is over {limit >> 20 or limit >> 10} {'MB' if limit >> 20 else 'KB'};"
                         f" the limit for {what}")
    return data


def _read_captions_jsonl(path: Path) -> dict[str, list[str]]:
    """{"file": "cat.jpg", "captions": ["...", ...]} (or "caption": "...") per line."""
    if path.stat().st_size > MAX_JSONL_BYTES:
        raise StoreError(f"{path.name} is over {MAX_JSONL_BYTES >> 20} MB; the limit for a "
                         "captions file")
    out: dict[str, list[str]] = {}
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise StoreError(f"{path.name} is not UTF-8 text") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}, line {n}"
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("file"), str):
            raise StoreError(f"{where}: expected a JSON object with 'file' and 'captions' (or "
                             "'caption')")
        caps = row.get("captions", [row["caption"]] if "caption" in row else [])
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise StoreError(f"{where}: 'captions' must be a list of strings and 'caption' a "
                             "string")
        caps = [c.strip() for c in caps if c.strip()]
        if len(caps) > MAX_CAPTIONS:
            raise StoreError(f"{where}: {len(caps)} captions; an image may have at most "
                             f"{MAX_CAPTIONS}")
        out[Path(row["file"]).name] = caps
    return out


def _zip_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> Callable[[], bytes]:
    """Reads one member, streamed and cut at `limit` bytes whatever its header declares."""

    def read() -> bytes:
        try:
            with zf.open(info) as f:
                data = f.read(limit + 1)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError,
                ValueError) as e:  # zlib, bz2 and lzma errors are OSError or ValueError
            why = "is encrypted" if "encrypted" in str(e) else "is damaged in the zip"
            raise StoreError(f"{why}; it could not be unpacked") from None
        if len(data) > limit:
            raise StoreError(f"unpacks to more than its header declares (over {limit >> 10} "
                             "KB); refused as damaged")
        return data

    return read


def _from_zip(path: Path, name: str | None = None) -> Iterator[Upload | tuple[str, str]]:
    """Uploads of a zip's images, read one at a time when added, never extracted to disk.
    Refused before unpacking: members over MAX_FILE_BYTES or compressed more than
    MAX_ZIP_RATIO to 1 (zip bombs), names with control characters, nested zips."""
    name = printable(name or path.name)
    try:
        zf = zipfile.ZipFile(path)
        infos = [i for i in zf.infolist() if not i.is_dir()]
    except UnicodeDecodeError:
        yield (name, "has file names that are not valid UTF-8 although the zip says they are")
        return
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError):
        yield (name, "is not a zip file that can be read (damaged, or not a zip)")
        return
    if len(infos) > MAX_ZIP_MEMBERS:
        yield (name, f"holds {len(infos)} files; the limit is {MAX_ZIP_MEMBERS}")
        return
    images = [i for i in infos if Path(i.filename).suffix.lower() in IMAGE_SUFFIXES]
    if sum(i.file_size for i in images) > MAX_ZIP_BYTES:
        yield (name, f"unpacks to more than {MAX_ZIP_BYTES >> 30} GB of images")
        return
    texts = {Path(i.filename).with_suffix("").as_posix(): i for i in infos
             if i.filename.lower().endswith(".txt")}
    found = False
    for info in infos:
        member = f"{name}:{printable(info.filename)}"
        suffix = Path(info.filename).suffix.lower()
        if suffix == ".zip":
            yield (member, "is a zip inside the zip; unpack it and add its images")
            continue
        if suffix not in IMAGE_SUFFIXES:
            continue
        found = True
        if printable(info.filename) != info.filename:
            yield (member, "has control characters in its name")
            continue
        if info.file_size > MAX_FILE_BYTES:
            yield (member, f"is {info.file_size >> 20} MB; the limit is "
                           f"{MAX_FILE_BYTES >> 20} MB")
            continue
        if info.file_size > 1 << 20 and info.file_size > MAX_ZIP_RATIO * max(1,
                                                                              info.compress_size):
            yield (member, f"unpacks {info.file_size // max(1, info.compress_size)} times "
                           "larger than it is stored, which no image does; refused before "
                           "unpacking")
            continue
        side = texts.get(Path(info.filename).with_suffix("").as_posix())
        up = Upload(member, reader=_zip_reader(zf, info, MAX_FILE_BYTES))
        if side is not None and side.file_size > MAX_CAPTION_FILE_BYTES:
            yield (f"{name}:{printable(side.filename)}", f"is over {MAX_CAPTION_FILE_BYTES >> 10}"
                   " KB; a caption file holds a few lines of text")
        elif side is not None:
            side_read = _zip_reader(zf, side, MAX_CAPTION_FILE_BYTES)
            up.caption_reader = lambda r=side_read, n=side.filename: read_caption_file(r(), n)
        yield up
    if not found:
        yield (name, "holds no image files (PNG, JPEG, GIF, WebP, BMP or TIFF)")


def _from_file(path: Path, name: str | None = None) -> Upload | tuple[str, str]:
    name = printable(name or path.name)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        return (name, f"is {size >> 20} MB; the limit is {MAX_FILE_BYTES >> 20} MB")
    up = Upload(name, reader=lambda: _read_limited(path, MAX_FILE_BYTES, "an image file"))
    side = path.with_suffix(".txt")
    if side.is_file():
        up.caption_reader = lambda: read_caption_path(side)
    return up


def collect(paths: list[Path | str], captions: Path | str | None = None
            ) -> tuple[list[Upload], list[tuple[str, str]]]:
    """Uploads from files, folders (searched recursively for images) and zip files; their
    bytes are read one at a time as they are added.

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
                skipped.append((printable(p.name), "the folder holds no image files"))
            items = [_from_file(f, f.relative_to(p).as_posix()) for f in found]
        elif p.is_file() and p.suffix.lower() == ".zip":
            items = list(_from_zip(p))
        elif p.is_file():
            items = [_from_file(p)]
        else:
            items = [(printable(p.name), "no such file or folder")]
        for it in items:
            if isinstance(it, Upload):
                if it.filename in table:
                    it.captions, it.caption_reader = table[it.filename], None
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


def _declared_pixels(data: bytes, name: str) -> int:
    """Width × height from an image file's header, without decoding it; 0 where open_image,
    next, refuses the file anyway (and says why)."""
    try:
        w, h = declared_size(data, name)
    except ImageError:
        return 0
    return w * h


def _pixel_hash(image: Image.Image) -> str:
    """The identity of an image's content: the same picture in another file format has it."""
    h = hashlib.sha256(f"{image.mode} {image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def bundle_lock(root: Path, exclusive: bool) -> Iterator[None]:
    """An fcntl lock on `<bundle>/.lock`: exclusive for a writer, shared for a reader, across
    processes. A bundle folder nobody can write to (a read-only copy) needs no lock to read."""
    try:
        f = open(root / ".lock", "a")  # noqa: SIM115 (closed below)
    except OSError:
        if exclusive:
            raise StoreError(f"the bundle folder {root.name} is read-only; copy it to change "
                             "it") from None
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _writing(engine: Engine) -> Iterator[None]:
    """One writer at a time, in this process and across processes; if another process changed
    the bundle since this engine read it, the engine reads the new state first, so no change
    is lost. If the change fails, the engine goes back to the state on disk, so nothing of it
    stays behind in memory either."""
    with engine.write_lock, bundle_lock(engine.root, exclusive=True):
        on_disk = json.loads((engine.root / MANIFEST).read_text())
        if on_disk.get("generation", 0) != engine.manifest.get("generation", 0):
            engine.reload(lock=False)
        try:
            yield
        except StoreError:
            raise  # refused before anything changed
        except BaseException:
            engine.reload(lock=False)
            raise


def next_ids(engine: Engine) -> tuple[int, int]:
    """The next gallery id and caption id: past every id the bundle has ever given, removed
    ones included (the manifest's counters, and the labels hnswlib keeps as deleted)."""
    g = engine.manifest["gallery"]
    img = max([int(g.get("next_id", 0)), *(i + 1 for i in engine.gallery),
               *(i + 1 for i in engine.indexes["images"].labels())])
    cap = max([int(g.get("next_caption_id", 0)), *(i + 1 for i in engine.captions),
               *(i + 1 for i in engine.indexes["captions"].labels())])
    return img, cap


def _reason(e: Exception, name: str) -> str:
    """The message of an error about one upload, without the upload's name in front."""
    text = str(e.args[0]) if e.args else str(e)
    for prefix in (name, "The upload", "the image"):
        text = text.removeprefix(prefix)
    return text.strip().removeprefix(":").strip()


def add(engine: Engine, uploads: list[Upload],
        progress: Callable[[int, int], None] | None = None,
        batch: int = settings.ENCODE_BATCH, limits: Limits | None = None) -> Added:
    """Embed `uploads` with the bundle's encoders, add them to the gallery and both indexes
    (searchable at once) and publish the new state of the bundle on disk.

    Images are read, decoded and embedded one at a time (embedded `batch` at a time), so an
    upload's memory is that of one image. A file that cannot be used is skipped with its
    reason; an image already in the gallery (the same pixels) is reported with its id. If
    anything else fails (or `progress` raises, as when a request is cancelled), nothing of
    the change stays: not in memory, not on disk.
    """
    limits = limits or Limits()
    skipped: list[tuple[str, str]] = []
    existing: dict[str, int] = {}
    if limits.images is not None and len(uploads) > limits.images:
        skipped += [(up.name, f"is past the {limits.images} images one upload may add; add "
                              "it in another") for up in uploads[limits.images:]]
        uploads = uploads[:limits.images]
    root = engine.root
    with _writing(engine):
        next_id, next_cap = next_ids(engine)
        seen = {it["sha256"]: i for i, it in engine.gallery.items() if "sha256" in it}
        items: list[dict] = []
        new_files: list[str] = []
        img_vecs, cap_vecs = [], []
        pixels = done = 0
        try:
            for start in range(0, len(uploads), batch):
                xs, batch_items, texts = [], [], []
                for up in uploads[start:start + batch]:
                    try:
                        data = up.load()
                        px = _declared_pixels(data, up.name)
                        if limits.pixels is not None and pixels + px > limits.pixels:
                            raise StoreError(f"would pass the {limits.pixels / 1e6:.0f} "
                                             "megapixels one upload may add; add it in another")
                        pixels += px
                        image = open_image(data, up.name)
                    except (StoreError, ImageError) as e:
                        skipped.append((up.name, _reason(e, up.name)))
                        continue
                    del data
                    digest = _pixel_hash(image)
                    if digest in seen:
                        existing[up.name] = seen[digest]
                        skipped.append((up.name, f"is already in the gallery as id "
                                                 f"{seen[digest]}"))
                        continue
                    try:
                        caps = _clean_captions(engine, up.load_captions())
                    except StoreError as e:
                        skipped.append((f"the captions of {up.name}", _reason(e, up.name)))
                        caps = []
                    rel = f"gallery/{next_id}.png"
                    new_files.append(rel)
                    _write_bytes(root / rel, _thumbnail(image))
                    xs.append(preprocess([image], engine.spec))
                    del image
                    cids = list(range(next_cap, next_cap + len(caps)))
                    next_cap += len(caps)
                    seen[digest] = next_id
                    batch_items.append({"id": next_id, "file": rel, "caption_ids": cids,
                                        "captions": caps, "source": up.name,
                                        "sha256": digest})
                    texts += caps
                    next_id += 1
                if batch_items:
                    img_vecs.append(engine.encode_preprocessed(np.concatenate(xs)))
                    if texts:
                        cap_vecs.append(engine.encode_texts(texts))
                    items += batch_items
                done += len(uploads[start:start + batch])
                if progress:
                    progress(done, len(uploads))
            if items:
                # the gallery first, then the indexes: a search never finds an id it can't show
                for it in items:
                    engine.gallery[it["id"]] = it
                    for cid, text in zip(it["caption_ids"], it["captions"]):
                        engine.captions[cid] = (text, it["id"])
                engine.indexes["images"].add(np.concatenate(img_vecs),
                                             [it["id"] for it in items])
                if cap_vecs:
                    engine.indexes["captions"].add(
                        np.concatenate(cap_vecs), [c for it in items for c in it["caption_ids"]])
                commit(engine, new_files)
        except BaseException:
            for rel in new_files:
                (root / rel).unlink(missing_ok=True)
            raise
        return Added([it["id"] for it in items], skipped, existing)


def parse_ids(text: str) -> list[int]:
    """Gallery ids from what a person typed: whole numbers in ASCII digits, separated by commas
    or spaces. StoreError says which word is not an id."""
    words = str(text or "").replace(",", " ").split()
    if not words:
        raise StoreError("Type the ids to remove, e.g. '1001, 1002' (shown under each image).")
    for w in words:
        if not (w.isascii() and w.isdigit() and len(w) <= 12):
            shown = printable(w if len(w) <= 20 else w[:20] + "...")
            raise StoreError(f"'{shown}' is not a gallery id: ids are whole numbers written with "
                             "the digits 0-9, such as 1001")
    return [int(w) for w in words]


def remove(engine: Engine, ids: list[int], owned: set[int] | None = None,
           shipped: bool = False) -> list[int]:
    """Take gallery items out of the indexes and the gallery, and publish the new state.

    Refused, with nothing removed, if any id is repeated, unknown or removed already; if it is
    one of the bundle's own images and `shipped` is False (only the CLI removes those); or if
    `owned` is given (the ids a visitor of a shared app added) and does not hold it.
    """
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in ids):
        raise StoreError(f"ids must be whole numbers, not {[type(i).__name__ for i in ids]}")
    ids = [int(i) for i in ids]
    if not ids:
        raise StoreError("no ids given")
    with _writing(engine):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise StoreError(f"id {twice[0]} is given more than once; nothing was removed")
        removed = engine.indexes["images"].deleted
        for i in ids:
            if i not in engine.gallery:
                if i in removed:
                    raise StoreError(f"id {i} was removed already; nothing was removed")
                raise StoreError(f"no gallery item with id {i}; nothing was removed")
            if not shipped and "source" not in engine.gallery[i]:
                raise StoreError(f"id {i} is one of the bundle's own images; those are removed "
                                 "only with `python -m mmdemo.index remove`; nothing was removed")
            if owned is not None and i not in owned:
                raise StoreError(f"id {i} was not added in this session: on a shared app each "
                                 "visitor removes only the images they added; nothing was "
                                 "removed")
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
    next_id, next_cap = next_ids(engine)
    manifest["gallery"].update(file=gal_rel, count=len(items),
                               captions=sum(len(it["captions"]) for it in items),
                               next_id=next_id, next_caption_id=next_cap)
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
    engine.published(manifest)
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


# ----------------------------------------------------------------------------- repair


def repair(engine: Engine) -> dict:
    """Make a bundle whose gallery and indexes disagree consistent again, and publish it.

    `engine` comes from `Engine.load(root, gallery=False)`: its models and manifest, no gallery.
    The gallery file is the truth: items whose thumbnail is missing or damaged are dropped;
    every other item is indexed with the vector its index holds, or embedded again from its
    thumbnail where the index lacks it (or cannot be read). Ids stay as they were and are
    never given again. Returns what was done.
    """
    from mmdemo.index import VectorIndex

    root, manifest = engine.root, engine.manifest
    with engine.write_lock, bundle_lock(root, exclusive=True):
        gal_path = root / manifest["gallery"]["file"]
        try:
            items = json.loads(gal_path.read_text())["items"]
        except (OSError, ValueError, KeyError, TypeError):
            raise BundleError(f"{root}: the gallery file {gal_path.name} is missing or damaged; "
                              "it cannot be repaired: export the bundle again") from None
        files = manifest["files"]
        kept, dropped = [], []
        for it in items:
            p = root / it["file"]
            ok = p.is_file() and (it["file"] not in files or sha256_file(p) == files[it["file"]])
            if ok and it["file"] not in files:
                try:
                    open_image(p.read_bytes(), it["file"])
                except ImageError:
                    ok = False
            (kept if ok else dropped).append(it)
        old: dict[str, VectorIndex | None] = {}
        for name, info in manifest["indexes"].items():
            try:  # its sidecar's hash is checked before hnswlib reads it
                old[name] = VectorIndex.load(root / info["file"])
            except (BundleError, RuntimeError, OSError, ValueError, KeyError):
                old[name] = None
        embedded = {"images": 0, "captions": 0}
        engine.gallery = {int(it["id"]): it for it in kept}
        engine.captions = {int(c): (t, int(it["id"])) for it in kept
                           for c, t in zip(it["caption_ids"], it["captions"])}
        wanted = {"images": sorted(engine.gallery), "captions": sorted(engine.captions)}
        encoder = {name: files[manifest["models"][info["encoder"]]["file"]]
                   for name, info in manifest["indexes"].items()}
        counters = {"images": int(manifest["gallery"].get("next_id", 0)),
                    "captions": int(manifest["gallery"].get("next_caption_id", 0))}
        for name in manifest["indexes"]:
            idx, ids = old[name], wanted[name]
            live = idx.live_ids() if idx is not None else set()
            if idx is not None:
                counters[name] = max([counters[name], *(i + 1 for i in idx.labels())])
            have = [i for i in ids if i in live]
            need = [i for i in ids if i not in live]
            dim = int(engine.sessions["image_encoder"].get_outputs()[0].shape[-1])
            new = VectorIndex(dim, len(ids), encoder_sha256=encoder[name])
            if have:
                new.add(idx.vectors(have), have)  # type: ignore[union-attr]
            if need:
                if name == "images":
                    vecs = engine.encode_images([open_image(root / engine.gallery[i]["file"])
                                                 for i in need])
                else:
                    vecs = engine.encode_texts([engine.captions[c][0] for c in need])
                new.add(vecs, need)
            embedded[name] = len(need)
            engine.indexes[name] = new
        manifest["gallery"]["next_id"] = max(counters["images"],
                                             max(engine.gallery, default=-1) + 1)
        manifest["gallery"]["next_caption_id"] = max(counters["captions"],
                                                     max(engine.captions, default=-1) + 1)
        for it in dropped:
            manifest["files"].pop(it["file"], None)
        commit(engine, [it["file"] for it in kept if it["file"] not in files])
        return {"items": len(kept), "dropped": [it["id"] for it in dropped],
                "embedded_again": embedded}
