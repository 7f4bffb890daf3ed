"""Serving's numpy preprocessing equals training's torchvision eval transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmdemo.preprocess import PreprocessSpec, preprocess, to_pil
from training.data.transforms import eval_transform


def _images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    big = Image.fromarray(rng.integers(0, 256, (97, 130, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (70, 70), dtype=np.uint8), "L")
    pal = big.convert("P")
    return [rgb, big, rgba, gray, pal]


@pytest.mark.parametrize("interp", ["bilinear", "bicubic", "nearest"])
def test_parity_with_torchvision(interp):
    spec = PreprocessSpec(size=64, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3],
                          interpolation=interp)
    tf = eval_transform(spec)
    for img in _images():
        ref = tf(to_pil(img)).numpy()
        got = preprocess([img], spec)[0]
        diff = float(np.abs(ref - got).max())
        assert diff <= 1e-5, f"{img.mode} {img.size} {interp}: max abs diff {diff}"
        assert got.dtype == np.float32 and got.shape == (3, 64, 64)


def test_arrays_and_modes_are_accepted():
    spec = PreprocessSpec()
    arr = np.zeros((30, 20, 3), np.uint8)
    arr[..., 0] = 255
    x = preprocess([arr, arr.astype(np.float32) / 255, arr[..., :1]], spec)
    assert np.allclose(x[0], x[1])
    red = (1.0 - 0.5) / 0.25
    assert np.allclose(x[0][0], red) and np.allclose(x[0][1], (0 - 0.5) / 0.25)
    assert torch.from_numpy(x).isfinite().all()


@pytest.mark.parametrize("bad, msg", [(np.zeros((4, 4, 2), np.uint8), "expected"),
                                      (np.zeros((0, 4, 3), np.uint8), "no pixels"),
                                      (np.full((4, 4), np.nan), "non-finite"),
                                      ("cat.png", "cat.png: no such file"),
                                      (12, "expected an image")])
def test_bad_images_are_refused_with_the_reason(bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        preprocess([bad], PreprocessSpec())
