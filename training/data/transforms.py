"""torchvision transforms built from the bundle's preprocessing spec (mmdemo.preprocess)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T
from tqdm import tqdm

from mmdemo.preprocess import PreprocessSpec

_MODES = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
          "nearest": T.InterpolationMode.NEAREST}


def eval_transform(spec: PreprocessSpec) -> T.Compose:
    """PIL RGB image -> float32 (3, size, size), normalised. No augmentation: in the shapes
    world a flip would turn "left of" into "right of"."""
    return T.Compose([T.Resize((spec.size, spec.size), interpolation=_MODES[spec.interpolation]),
                      T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def image_batches(paths: list[Path], spec: PreprocessSpec, batch: int, desc: str = "images"
                  ) -> Iterator[torch.Tensor]:
    """The eval transform over `paths`, `batch` images at a time (float32 (b, 3, size, size)),
    with a progress bar: for sets too large to hold in memory at once."""
    tf = eval_transform(spec)
    with tqdm(total=len(paths), desc=desc, unit="img", leave=False) as bar:
        for s in range(0, len(paths), batch):
            out = []
            for p in paths[s: s + batch]:
                with Image.open(p) as im:
                    out.append(tf(im.convert("RGB")))
            bar.update(len(out))
            yield torch.stack(out)


def load_images(paths: list[Path], spec: PreprocessSpec, desc: str = "images") -> torch.Tensor:
    """All images through the eval transform, stacked: float32 (N, 3, size, size)."""
    tf = eval_transform(spec)
    out = torch.empty(len(paths), 3, spec.size, spec.size)
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", leave=False)):
        with Image.open(p) as im:
            out[i] = tf(im.convert("RGB"))
    return out
