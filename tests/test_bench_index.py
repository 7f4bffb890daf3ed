"""The index benchmark: its vector distributions, its exact search and a small real run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmdemo.bench.index import (
    base_vectors,
    default_serve_ef,
    exact_topk,
    model_like,
    pick_sigma,
    plot,
    run,
    table,
    uniform,
)
from mmdemo.bundle import write_manifest
from mmdemo.index import VectorIndex


def clustered(n: int, d: int, seed: int, clusters: int = 12, spread: float = 0.3) -> np.ndarray:
    """Unit vectors float32 (n, d) around a few random centres: a stand-in for embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(clusters, size=n)] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def nearest_distance(x: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Brute force, float64: distance from each row of x to its nearest row of base."""
    x, base = x.astype(np.float64), base.astype(np.float64)
    return np.sqrt(((x[:, None, :] - base[None, :, :]) ** 2).sum(-1).min(axis=1))


def test_pick_sigma_is_the_median_gap_over_sqrt_d():
    base = clustered(300, 32, seed=0)
    sigma = pick_sigma(base)
    d2 = ((base[:, None, :].astype(np.float64) - base[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    want = float(np.median(np.sqrt(d2.min(axis=1)))) / math.sqrt(32)
    assert sigma > 0
    assert sigma == pytest.approx(want, rel=1e-3), (sigma, want)


def test_pick_sigma_ignores_duplicates_and_refuses_a_single_point():
    base = clustered(200, 16, seed=1)
    assert pick_sigma(np.concatenate([base, base])) > 0  # every vector has a twin at distance 0
    with pytest.raises(ValueError, match="identical"):
        pick_sigma(np.repeat(base[:1], 5, axis=0))


def test_model_like_vectors_stay_near_the_gallery():
    base = clustered(300, 32, seed=2)
    sigma = pick_sigma(base)
    x = model_like(base, 1000, np.random.default_rng(0), sigma)
    u = uniform(1000, 32, np.random.default_rng(0))
    for v in (x, u):
        assert v.dtype == np.float32 and v.shape == (1000, 32)
        assert np.abs(np.linalg.norm(v, axis=1) - 1).max() < 1e-5
    near_x, near_u = nearest_distance(x, base), nearest_distance(u, base)
    # a perturbation is about one gallery gap long; a uniform vector is far from everything
    assert np.median(near_x) < 2 * sigma * math.sqrt(32), (np.median(near_x), sigma)
    assert np.median(near_x) < 0.5 * np.median(near_u), (np.median(near_x), np.median(near_u))
    again = model_like(base, 1000, np.random.default_rng(0), sigma)
    np.testing.assert_array_equal(x, again)


def test_exact_topk_matches_a_full_sort():
    x = clustered(3000, 24, seed=3)
    q = clustered(300, 24, seed=4)  # more than one chunk of 256 queries
    ids, scores = exact_topk(x, q)
    full = q.astype(np.float64) @ x.T.astype(np.float64)
    want = np.argsort(-full, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), atol=1e-5)


def handmade_bundle(root, d: int = 32):
    """A bundle directory holding only what base_vectors reads: a manifest and two indexes
    (sidecars, hashes) in the real formats; one image removed, as mmdemo.store leaves it."""
    root.mkdir()
    images, captions = clustered(400, d, seed=5), clustered(1200, d, seed=6)
    for name, vectors in (("images", images), ("captions", captions)):
        index = VectorIndex(d, len(vectors))
        index.add(vectors, np.arange(100, 100 + len(vectors)))
        if name == "images":
            index.remove([100])
        index.save(root / f"index_{name}.bin")
    write_manifest(root, {"indexes": {
        "images": {"file": "index_images.bin", "count": 399},
        "captions": {"file": "index_captions.bin", "count": 1200}}})
    return root, images[1:], captions


def test_base_vectors_reads_back_what_the_index_holds(tmp_path):
    root, images, captions = handmade_bundle(tmp_path / "bundle")
    base = base_vectors(root)
    assert base["images"].dtype == np.float32
    np.testing.assert_allclose(base["images"], images, atol=1e-6)  # by id, removed one gone
    np.testing.assert_allclose(base["captions"], captions, atol=1e-6)


def check_result(result: dict, model_n: int) -> None:
    """What any run must satisfy, whatever the machine's speed."""
    serve = result["serve_ef"]
    assert serve == default_serve_ef() and serve in result["efs"]
    assert result["sigma"] > 0 and result["M"] > 0 and result["ef_construction"] > 0
    for r in result["runs"]:
        sweep = r["sweep"]
        assert [s["ef"] for s in sweep] == result["efs"]
        recalls = [s["recall@10"] for s in sweep]
        assert all(0 <= v <= 1 for v in recalls), recalls
        assert all(b >= a - 0.02 for a, b in zip(recalls, recalls[1:])), recalls
        assert r["exact_bytes"] == r["n"] * result["dim"] * 4 and r["index_bytes"] > 0
        for s in sweep:
            exact = r["exact"]
            assert s["single_speedup"] == pytest.approx(
                exact["single"]["median_ms"] / s["single"]["median_ms"])
            assert s["batch_speedup"] == pytest.approx(s["batch_qps"] / exact["batch_qps"])
        good = [s for s in sweep if s["recall@10"] >= 0.98]
        if good:
            assert r["best"]["ef"] == good[0]["ef"]
            assert r["best"]["batch_speedup"] == good[0]["batch_speedup"]
        else:
            assert r["best"] is None
        at_serve = next(s for s in sweep if s["ef"] == serve)
        assert r["serve"]["recall@10"] == at_serve["recall@10"]
    model = next(r for r in result["runs"] if r["distribution"] == "model" and r["n"] == model_n)
    assert model["sweep"][-1]["recall@10"] >= 0.95, model["sweep"]


def small_run(bundle, tmp_path) -> dict:
    said: list[str] = []
    result = run(bundle, sizes=(2000,), uniform_sizes=(1000,), efs=(10, 50), queries=50,
                 threads=2, progress=said.append, budget_s=0.2)
    assert [(r["distribution"], r["n"]) for r in result["runs"]] == [("model", 2000),
                                                                    ("uniform", 1000)]
    assert any("building" in s for s in said), said
    check_result(result, 2000)
    md = table(result)
    assert md.count("\n| model | 2000 |") == 1 + len(result["efs"]), md
    plot(result, tmp_path / "index.png")
    assert (tmp_path / "index.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result


def test_run_on_a_handmade_bundle(tmp_path):
    root, _, _ = handmade_bundle(tmp_path / "bundle")
    small_run(root, tmp_path)


@pytest.mark.slow
def test_run_on_a_real_bundle(tiny_bundle, tmp_path):
    small_run(tiny_bundle, tmp_path)
