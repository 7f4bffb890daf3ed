"""hnswlib index: explicit ids, agreement with exact search, a sidecar that refuses mismatches."""

from __future__ import annotations

import numpy as np
import pytest

from mmdemo.bundle import BundleError
from mmdemo.index import VectorIndex


def _unit(n, d, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8)) @ rng.normal(size=(8, d)) + 0.3 * rng.normal(size=(n, d))
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def test_search_matches_exact_with_explicit_ids(tmp_path):
    x = _unit(500, 32)
    ids = np.arange(500) * 7 + 1000  # ids are labels, not positions
    idx = VectorIndex(32, 100, encoder_sha256="abc")  # grows past max_elements
    idx.add(x[:300], ids[:300])
    idx.add(x[300:], ids[300:])
    q = _unit(50, 32, seed=1)
    got, scores = idx.search(q, 10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean([len(set(g) & set(ids[e])) / 10 for g, e in zip(got, exact)])
    assert recall >= 0.98, recall
    assert np.allclose(scores[:, 0], (q @ x.T).max(1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_save_load_and_mismatches(tmp_path):
    x = _unit(100, 16)
    idx = VectorIndex(16, 100, encoder_sha256="enc1")
    idx.add(x, np.arange(100) + 5)
    idx.save(tmp_path / "i.bin")
    back = VectorIndex.load(tmp_path / "i.bin", encoder_sha256="enc1")
    assert len(back) == 100
    assert (back.search(x[:3], 1)[0][:, 0] == np.arange(3) + 5).all()
    with pytest.raises(BundleError, match="built by encoder"):
        VectorIndex.load(tmp_path / "i.bin", encoder_sha256="enc2")
    data = bytearray((tmp_path / "i.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF  # corrupt the middle: hnswlib alone would load it
    (tmp_path / "i.bin").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        VectorIndex.load(tmp_path / "i.bin")


def test_wrong_shapes_are_refused():
    idx = VectorIndex(8, 10)
    with pytest.raises(ValueError, match=r"expected \(N, 8\)"):
        idx.add(np.zeros((2, 4), np.float32), np.arange(2))
    with pytest.raises(ValueError, match="2 ids for 3 vectors"):
        idx.add(np.zeros((3, 8), np.float32), np.arange(2))
    with pytest.raises(ValueError, match="dim 4"):
        idx.search(np.zeros((1, 4), np.float32), 1)
