"""Image preprocessing in numpy and Pillow, the same arithmetic as training's eval transform.

The spec travels in the bundle's manifest: {"size": 64, "mean": [...], "std": [...],
"interpolation": "bilinear"}. Training builds its torchvision transform from the same dict
(`training.data.transforms.eval_transform`); a parity test pins the two together.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


class ImageError(ValueError):
    """An input that is not an image mmdemo can read; the message says what is wrong."""


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """A decoded RGB image from a file path or the bytes of a file.

    Refuses, with a message that says why: empty files, files that are not images, damaged
    or truncated image data, and images over MAX_PIXELS (read from the header, so a
    decompression bomb is never decoded). Takes the first frame of an animation, turns the
    image as its EXIF orientation says, and brings 16-bit, palette, CMYK, grayscale and
    transparent images to 8-bit RGB (transparency over black, as training saw it).
    """
    if isinstance(source, (bytes, bytearray)):
        name, fp, size = name or "the image", io.BytesIO(source), len(source)
    else:
        path = Path(source)
        name = name or path.name
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        fp, size = path, path.stat().st_size
    if size == 0:
        raise ImageError(f"{name} is empty (0 bytes); upload an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError:
        raise ImageError(f"{name} has more pixels than the limit of {MAX_PIXELS / 1e6:.0f} "
                         "megapixels; it was refused before decoding") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image file Pillow can read (PNG, JPEG, GIF, WebP, "
                         "BMP, TIFF ...)") from None
    except OSError as e:
        raise ImageError(f"{name} could not be read as an image: {e}") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name} is {w}×{h} pixels ({w * h / 1e6:.0f} megapixels); the limit is "
                         f"{MAX_PIXELS / 1e6:.0f} megapixels, so it was refused before decoding")
    if w < 1 or h < 1:
        raise ImageError(f"{name} has no pixels ({w}×{h})")
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # an animation: its first frame
        im.load()
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: the image data is damaged or truncated ({e})") from None
    return to_pil(im)


def to_pil(image: Image.Image | np.ndarray | str | Path | bytes) -> Image.Image:
    """An RGB PIL image from a PIL image of any mode, a uint8/float array (H, W[, C]), or a
    file path or bytes (read with `open_image`)."""
    if isinstance(image, (str, Path, bytes, bytearray)):
        return open_image(image)
    if isinstance(image, Image.Image):
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit, float gray
            arr = np.asarray(image, dtype=np.float64)
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
            image = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8))
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
