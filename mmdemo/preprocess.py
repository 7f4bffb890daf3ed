"""Image preprocessing in numpy and Pillow, the same arithmetic as training's eval transform.

The spec travels in the bundle's manifest: {"size": 64, "mean": [...], "std": [...],
"interpolation": "bilinear"}. Training builds its torchvision transform from the same dict
(`training.data.transforms.eval_transform`); a parity test pins the two together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

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


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image from a PIL image of any mode or a uint8/float array (H, W[, C])."""
    if isinstance(image, Image.Image):
        if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            bg = Image.new("RGBA", image.size, (0, 0, 0, 255))
            return Image.alpha_composite(bg, image).convert("RGB")
        return image.convert("RGB")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
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
