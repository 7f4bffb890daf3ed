"""Image preprocessing in numpy and Pillow, the same arithmetic as training's eval transform.

The spec travels in the bundle's manifest: {"size": 64, "mean": [...], "std": [...],
"interpolation": "bilinear"}. Training builds its torchvision transform from the same dict
(`training.data.transforms.eval_transform`); a parity test pins the two together.

`open_image` is the boundary where untrusted files (uploads) are decoded. It refuses what it
cannot use with a sentence about the file, checks sizes before decoding, shrinks a large image
right after decoding (before any conversion), and makes concurrent calls share a budget of
decoded bytes, so a burst of hostile uploads cannot take the server's memory.
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "nearest": Image.NEAREST}


@dataclass
class PreprocessSpec:
    size: int = 64  # images are resized to size x size
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # per RGB channel
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])  # per RGB channel
    interpolation: str = "bilinear"  # bilinear | bicubic | nearest

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        spec = cls(**d)
        if spec.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation {spec.interpolation!r} is not one of "
                             f"{sorted(_INTERPOLATION)}")
        return spec


MAX_PIXELS = 40_000_000  # larger images are refused from their header, before any decoding
WORK_PIXELS = 4_000_000  # larger images are shrunk by an integer factor as soon as decoded
# (the models see 64-256 px, so nothing they use is lost); smaller ones are read unchanged
DECODE_BUDGET_BYTES = 200_000_000  # decoded pixels all open_image calls may hold at once
ICON_MAX_SIDE = 256  # pixels: the largest image an ICO or CUR entry can hold
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "ICO", "CUR", "PPM")  # the
# only decoders run on a file (JPEG includes MPO); Pillow's other plugins never see an upload
_BAND_PIXELS = 1 << 18  # pixels per strip where a large image is converted piece by piece
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2,
                    "I;16N": 2}  # as Pillow stores each mode; all others take 4 bytes
_DECODER_COPIES = {"WEBP": 4, "AVIF": 3}  # full-size buffers their decoders hold while
# loading (the library's canvases and a bytes copy, besides the image); others hold one
FORMAT_MAX_PIXELS = {"WebP": 16_000_000, "AVIF": 16_000_000}  # these decode whole, with no
# scaled decode, at ~15 bytes a pixel (a 40 MP WebP: +611 MB), so they stay under 300 MB
_HIGH_BIT_GRAY = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # 16-, 32-bit int, float gray
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn that undoes it
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first 8 bytes of a PNG file
_SIGNATURES = {_PNG_MAGIC: "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
               b"II*\0": "TIFF", b"MM\0*": "TIFF"}  # first bytes -> the format they announce
# (not ICO's or CUR's: four bytes that many TGA files also start with)


class ImageError(ValueError):
    """An input that is not an image mmdemo can read; the message says what is wrong."""


class _DecodeBudget:
    """A counting semaphore of bytes: how much decoded pixel data all threads hold at once."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a decode budget of {total} bytes cannot hold any image")
        self.total = total  # bytes
        self.free = total  # bytes nobody holds now
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Holds `nbytes` for the block, waiting until they are free. A request larger than
        the whole budget holds all of it: that image is decoded, alone."""
        if nbytes < 0:
            raise ValueError(f"cannot hold {nbytes} bytes of the decode budget")
        n = min(nbytes, self.total)
        with self._changed:
            self._changed.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self._changed:
                self.free += n
                self._changed.notify_all()


_DECODE_BUDGET = _DecodeBudget(DECODE_BUDGET_BYTES)


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """A decoded RGB image from a file path or the bytes of a file.

    Refuses, with a sentence naming the file (`name`, else the file's name) and saying why:
    empty files, files that are not images, damaged or truncated image data, and images over
    MAX_PIXELS or icons over ICON_MAX_SIDE (read from the headers, so a decompression bomb is
    never decoded). Takes the first frame of an animation or multi-page file, turns the image
    as its EXIF orientation says, and brings 16-bit, palette, CMYK, grayscale and transparent
    images to 8-bit RGB (transparency over black, as training saw it). An image over
    WORK_PIXELS comes back shrunk by the smallest integer factor that brings it to at most
    WORK_PIXELS (each pixel the mean of a block); smaller ones are read at full size.
    """
    fp, name = _file(source, name)
    with fp, _identify(fp, name) as im:
        return _decode(im, name)


def declared_size(source: str | Path | bytes, name: str | None = None) -> tuple[int, int]:
    """(width, height) as an image file's header declares them, without decoding any pixels
    (for totting up an upload before decoding it). Raises ImageError for what `open_image`
    refuses from the headers alone (empty files, files that are not images, oversized icons
    ...); MAX_PIXELS is left to `open_image`."""
    fp, name = _file(source, name)
    with fp, _identify(fp, name) as im:
        return im.size


def _identify(fp: BinaryIO, name: str) -> Image.Image:
    """The image in `fp` opened by one of FORMATS: its headers read, its pixels not decoded.
    (A DecompressionBombWarning, for 89 to 179 megapixels, is left to the log: the image is
    refused a moment later; a filter around it would be process-wide and not thread-safe.)"""
    _check_icon(fp, name)
    try:
        return Image.open(fp, formats=_formats())
    except Exception as e:  # a hostile header makes Pillow's plugins raise almost any type
        raise ImageError(_refusal(name, e, "its header could not be read", _kind(fp))) from None


def _file(source: str | Path | bytes, name: str | None) -> tuple[BinaryIO, str]:
    """The open binary file of `source` and the name its messages use."""
    if isinstance(source, (bytes, bytearray)):
        name, fp, size = name or "the image", io.BytesIO(source), len(source)
    else:
        path = Path(source)
        name = name or path.name
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        try:
            fp, size = path.open("rb"), path.stat().st_size
        except OSError:
            raise ImageError(f"{name} could not be opened for reading") from None
    if size == 0:
        fp.close()
        raise ImageError(f"{name} is empty (0 bytes); upload an image file")
    return fp, name


@functools.cache
def _formats() -> tuple[str, ...]:
    """FORMATS less those this Pillow was built without."""
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _kind(fp: BinaryIO) -> str | None:
    """The format the first bytes of `fp` announce (of FORMATS), or None."""
    fp.seek(0)
    head = fp.read(12)
    fp.seek(0)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES.items() if head.startswith(magic)), None)


def _check_icon(fp: BinaryIO, name: str) -> None:
    """Refuses an ICO or CUR file with an entry larger than an icon can be, from the entries'
    own headers. (Pillow decodes an icon while opening it, at the size the embedded PNG or
    bitmap says, which the icon directory does not bound.) Other files pass untouched."""
    head = fp.read(6)
    try:
        if len(head) < 6 or head[:4] not in (b"\0\0\1\0", b"\0\0\2\0"):
            return
        count = int.from_bytes(head[4:6], "little")
        directory = fp.read(16 * count)
        if len(directory) < 16 * count:
            raise ImageError(f"{name} is damaged or truncated: its icon directory is cut short")
        for i in range(count):
            fp.seek(int.from_bytes(directory[16 * i + 12:16 * i + 16], "little"))
            size = _icon_entry_size(fp.read(26))
            if size is None:
                raise ImageError(f"{name} is damaged or truncated: icon {i + 1} in it is "
                                 "neither a PNG nor a bitmap")
            w, h = size
            if w > ICON_MAX_SIDE or h > ICON_MAX_SIDE:
                raise ImageError(f"{name} is an icon file holding a {w}×{h} image "
                                 f"({w * h / 1e6:.1f} megapixels); an icon is at most "
                                 f"{ICON_MAX_SIDE}×{ICON_MAX_SIDE} pixels, so it was refused "
                                 "before decoding")
    finally:
        fp.seek(0)


def _icon_entry_size(header: bytes) -> tuple[int, int] | None:
    """(width, height) of the image an icon entry holds, from its first bytes: a PNG's IHDR or
    a bitmap header (whose height counts the mask too), read as Pillow reads them; None where
    it is neither."""
    if header[:8] == _PNG_MAGIC:
        if len(header) < 24:
            return None
        return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    if len(header) < 12:
        return None
    header_size = int.from_bytes(header[:4], "little")
    if header_size == 12:
        w, h = int.from_bytes(header[4:6], "little"), int.from_bytes(header[6:8], "little")
    elif header_size in (40, 52, 56, 64, 108, 124):
        w, h = int.from_bytes(header[4:8], "little"), int.from_bytes(header[8:12], "little")
        if header[11] == 0xFF:  # a negative height: the rows run top to bottom
            h = 2**32 - h
    else:
        return None
    return w, h // 2


def _decode(im: Image.Image, name: str) -> Image.Image:
    """The RGB image of an opened (not yet decoded) image file, within the decode budget."""
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageError(f"{name} has no pixels ({w}×{h})")
    fmt = {"WEBP": "WebP"}.get(im.format or "", im.format or "")
    limit = FORMAT_MAX_PIXELS.get(fmt, MAX_PIXELS)
    if w * h > limit:
        kind = f"for a {fmt} image " if limit != MAX_PIXELS else ""
        raise ImageError(f"{name} is {w}×{h} pixels ({w * h / 1e6:.0f} megapixels); the limit "
                         f"{kind}is {limit / 1e6:.0f} megapixels, so it was refused before "
                         "decoding")
    try:
        k = _reduction(w, h)
        if k > 1 and im.format in ("JPEG", "MPO"):  # libjpeg decodes at 1/2, 1/4 or 1/8 scale
            im.draft("RGB", (-(-w // k), -(-h // k)))
            k = _reduction(*im.size)
        with _DECODE_BUDGET.hold(_decoded_bytes(im, (w, h))):
            im.load()
            if k == 1:  # as it always was: the serving/training parity depends on it
                return to_pil(ImageOps.exif_transpose(im))
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            small = _reduce(im, k)
            im.close()  # frees the full-size pixels before the budget is given back
        if orientation in _ORIENTATION:
            small = small.transpose(_ORIENTATION[orientation])
        return to_pil(small)
    except ImageError:
        raise
    except Exception as e:  # damaged data makes Pillow's decoders raise almost any type
        raise ImageError(_refusal(name, e, "its image data could not be decoded")) from None


def _refusal(name: str, e: Exception, what_failed: str, kind: str | None = None) -> str:
    """The sentence that says why `name` (a `kind` file by its first bytes, if known) was
    refused when Pillow raised `e`, without Pillow's own words (which describe its
    internals, not the file)."""
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"{name} has more pixels than the limit of {MAX_PIXELS / 1e6:.0f} megapixels; "
                "it was refused before decoding")
    if isinstance(e, UnidentifiedImageError) and kind:
        return (f"{name} is damaged or truncated: it starts as {kind} files do, but its header "
                "could not be read")
    if isinstance(e, UnidentifiedImageError):
        return (f"{name} is not an image file mmdemo can read (PNG, JPEG, GIF, WebP, AVIF, BMP, "
                "TIFF or ICO)")
    if isinstance(e, MemoryError):
        return (f"{name} could not be decoded: the server ran out of memory; try again, or "
                "with a smaller image")
    if isinstance(e, ValueError) and "MAX_TEXT_CHUNK" in str(e):
        return (f"{name} has a text (metadata) chunk larger than "
                f"{PngImagePlugin.MAX_TEXT_CHUNK / 2**20:.0f} MB once decompressed; it was "
                "refused (save the image again without its metadata)")
    if isinstance(e, ValueError) and "MAX_TEXT_MEMORY" in str(e):
        return (f"{name} has more than {PngImagePlugin.MAX_TEXT_MEMORY / 2**20:.0f} MB of text "
                "(metadata) once decompressed; it was refused (save the image again without "
                "its metadata)")
    return f"{name} is damaged or truncated: {what_failed}"


def _reduction(w: int, h: int) -> int:
    """The smallest integer factor that shrinks a w×h image to at most WORK_PIXELS."""
    k = 1
    while -(-w // k) * -(-h // k) > WORK_PIXELS:
        k += 1
    return k


def _decoded_bytes(im: Image.Image, full_size: tuple[int, int]) -> int:
    """Bytes that decoding `im` holds at once: its pixels as Pillow stores them, times the
    full-size buffers its format's decoder keeps beside them; a progressive JPEG's decoder
    also keeps every component's DCT coefficients (2 bytes each) at `full_size`, even when
    it decodes at a reduced scale."""
    n = (im.width * im.height * _BYTES_PER_PIXEL.get(im.mode, 4)
         * _DECODER_COPIES.get(im.format or "", 1))
    if im.format in ("JPEG", "MPO") and im.info.get("progressive"):
        n += full_size[0] * full_size[1] * 2 * len(im.getbands())
    return n


def _bands(image: Image.Image) -> Iterator[Image.Image]:
    """`image` as full-width strips of about _BAND_PIXELS pixels, top to bottom."""
    w, h = image.size
    rows = max(1, _BAND_PIXELS // w)
    for y in range(0, h, rows):
        yield image.crop((0, y, w, min(y + rows, h)))


def _reduce(im: Image.Image, k: int) -> Image.Image:
    """`im` shrunk k times, as `Image.reduce(k)` (each pixel the mean of a k×k block), strip by
    strip so that no full-size copy is made. Strips of the modes whose values cannot be
    averaged are converted first, as `to_pil` would: 16-bit, 32-bit and float gray to 8-bit
    "L" (on the scale of the whole image), palette to RGB (RGBA where it has transparency),
    "1" to "L", "PA" to RGB."""
    w, h = im.size
    top = _gray_top(im) if im.mode in _HIGH_BIT_GRAY else 255.0
    rows = max(1, _BAND_PIXELS // (w * k)) * k
    out = None
    for y in range(0, h, rows):
        strip = im.crop((0, y, w, min(y + rows, h)))
        if strip.mode in _HIGH_BIT_GRAY:
            strip = _gray_to_l(strip, top)
        elif strip.mode == "P":
            strip = strip.convert("RGBA" if "transparency" in strip.info else "RGB")
        elif strip.mode in ("1", "PA"):
            strip = strip.convert({"1": "L", "PA": "RGB"}[strip.mode])
        strip = strip.reduce(k)
        if out is None:
            out = Image.new(strip.mode, (-(-w // k), -(-h // k)))
        out.paste(strip, (0, y // k))
    assert out is not None, f"an image of {w}×{h} pixels has no strips"
    return out


def _gray_top(image: Image.Image) -> float:
    """The value a 16-bit, 32-bit or float gray image's white is: 65535.0 where any pixel is
    above 255, else 255.0 (and 255.0 where a float image holds NaN)."""
    peak = np.max([np.asarray(band).max(initial=0) for band in _bands(image)])
    return 65535.0 if peak > 255 else 255.0


def _gray_to_l(image: Image.Image, top: float) -> Image.Image:
    """The 8-bit "L" image of a 16-bit, 32-bit or float gray image whose white is `top`:
    round(value / top * 255) clipped to 0..255, computed in float64 one strip at a time."""
    out = np.empty((image.height, image.width), dtype=np.uint8)
    y = 0
    for band in _bands(image):
        x = np.asarray(band, dtype=np.float64)  # (rows, W), in place below: one copy a strip
        x /= top
        x *= 255.0
        np.clip(x, 0, 255, out=x)
        out[y:y + x.shape[0]] = np.round(x, out=x)  # NaN casts as numpy's astype casts it
        y += x.shape[0]
    return Image.fromarray(out)


def to_pil(image: Image.Image | np.ndarray | str | Path | bytes) -> Image.Image:
    """An RGB PIL image from a PIL image of any mode, a uint8/float array (H, W[, C]), or a
    file path or bytes (read with `open_image`). 16-bit, 32-bit and float gray images become
    8-bit without a full-size float copy; transparency goes over black."""
    if isinstance(image, (str, Path, bytes, bytearray)):
        return open_image(image)
    if isinstance(image, Image.Image):
        if image.mode in _HIGH_BIT_GRAY:
            image = _gray_to_l(image, _gray_top(image))
        if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            bg = Image.new("RGBA", image.size, (0, 0, 0, 255))
            return Image.alpha_composite(bg, image).convert("RGB")
        return image.convert("RGB")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected an image (PIL image, array, file path or bytes), got "
                        f"{type(image).__name__}")
    arr = image
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"image array has shape {arr.shape}; expected (H, W), (H, W, 3) or "
                         "(H, W, 4)")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image array has shape {arr.shape}; it has no pixels")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
            raise ValueError(f"image array of dtype {arr.dtype} has non-finite values")
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
    return to_pil(Image.fromarray(arr))


def preprocess(images: list, spec: PreprocessSpec) -> np.ndarray:
    """float32 (N, 3, size, size), normalised by the spec's mean and std."""
    out = np.empty((len(images), 3, spec.size, spec.size), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    for i, img in enumerate(images):
        pil = to_pil(img)
        if pil.size != (spec.size, spec.size):
            pil = pil.resize((spec.size, spec.size), _INTERPOLATION[spec.interpolation])
        x = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, H, W)
        out[i] = (x - mean) / std
    return out
