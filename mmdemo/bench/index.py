"""hnswlib against exact search, on vectors like the model's own and on the worst case.

The database vectors come from two distributions:

- "model": a Gaussian kernel density over the bundle's image embeddings (a random gallery image
  vector plus isotropic noise, renormalised); the queries are the same kind of perturbation of
  the bundle's caption embeddings, i.e. text queries looking for images, as the app serves them.
- "uniform": i.i.d. Gaussian vectors, normalised (uniform on the sphere), with uniform queries:
  no structure at all, the worst case for graph indexes.

Exact search is numpy: scores = Q @ X.T, argpartition for the top 10, then a sort; it gives the
ground truth. The hnswlib side is `mmdemo.index.VectorIndex` with its default M and
ef_construction, so the figures are those of the index the app serves.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import itertools
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mmdemo.bench.common import md_table, timed
from mmdemo.bundle import read_manifest
from mmdemo.index import VectorIndex

K = 10  # recall@K, top-K of exact search
CHUNK = 65536  # rows generated at a time
QUERY_CHUNK = 256  # queries scored at a time by exact search: (256, N) float32 scores
TARGET_RECALL = 0.98  # `best` is the smallest ef that reaches this recall@10
DUPLICATE = 3e-3  # pick_sigma: base vectors closer than this count as one


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows of x scaled to unit L2 norm, in place; float32 (N, D)."""
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def base_vectors(bundle: Path) -> dict[str, np.ndarray]:
    """The bundle's own embeddings, read back from its indexes (hashes checked on load):
    {"images": float32 (N, D), "captions": float32 (M, D)}, L2-normalised, ordered by id.
    Removed items (marked deleted in the index) are left out."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=False)  # VectorIndex.load checks the index's hash
    out = {}
    for name in ("images", "captions"):
        info = manifest["indexes"].get(name)
        if info is None:
            raise ValueError(f"{bundle} has no {name!r} index; it has {list(manifest['indexes'])}")
        index = VectorIndex.load(bundle / info["file"])
        ids = sorted(set(index._index.get_ids_list()) - index.deleted)
        if not ids:
            raise ValueError(f"{bundle}: the {name} index is empty")
        vectors = np.asarray(index._index.get_items(ids), dtype=np.float32)
        if vectors.shape != (len(ids), index.dim):
            raise ValueError(f"{bundle}: the {name} index gave vectors of shape {vectors.shape}; "
                             f"expected ({len(ids)}, {index.dim})")
        out[name] = _normalise(vectors)
    if out["images"].shape[1] != out["captions"].shape[1]:
        raise ValueError(f"{bundle}: image vectors are {out['images'].shape[1]}-d, caption "
                         f"vectors {out['captions'].shape[1]}-d")
    return out


def pick_sigma(base: np.ndarray) -> float:
    """The kernel bandwidth for `model_like`, from base float32 (N, D) unit vectors.

    sigma = m / sqrt(D), where m is the median Euclidean distance from a base vector to its
    nearest other base vector (duplicates, closer than DUPLICATE, ignored). Noise of that sigma
    in D dimensions has length about sigma * sqrt(D) = m, so a perturbation moves a vector about
    as far as the gap between neighbouring gallery vectors: the samples fill the space between
    gallery items instead of piling onto them or washing them out.
    """
    base = np.ascontiguousarray(base, dtype=np.float32)
    n, d = base.shape
    if n < 2:
        raise ValueError(f"pick_sigma needs at least 2 base vectors; got {n}")
    nearest = np.empty(n, np.float32)
    for i in range(0, n, QUERY_CHUNK):
        cos = base[i:i + QUERY_CHUNK] @ base.T  # (c, N)
        dist2 = np.maximum(2.0 - 2.0 * cos, 0.0)  # squared distance of unit vectors
        # itself, and duplicates: closer than float32 rounding of `cos` can tell (~3e-3)
        dist2[dist2 < DUPLICATE ** 2] = np.inf
        dist2[np.arange(len(dist2)), np.arange(i, i + len(dist2))] = np.inf
        nearest[i:i + QUERY_CHUNK] = np.sqrt(dist2.min(axis=1))
    finite = nearest[np.isfinite(nearest)]
    if finite.size == 0:
        raise ValueError(f"all {n} base vectors are identical; no bandwidth to pick")
    return float(np.median(finite)) / math.sqrt(d)


def model_like(base: np.ndarray, n: int, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """n draws from a Gaussian kernel density over base float32 (M, D) unit vectors: a random
    base vector plus isotropic N(0, sigma^2) noise, renormalised. float32 (n, D), unit norm."""
    base = np.asarray(base, dtype=np.float32)
    if sigma <= 0:
        raise ValueError(f"sigma is {sigma}; expected > 0")
    out = np.empty((n, base.shape[1]), np.float32)
    for i in range(0, n, CHUNK):
        c = min(CHUNK, n - i)
        x = rng.standard_normal((c, base.shape[1]), dtype=np.float32)
        x *= np.float32(sigma)
        x += base[rng.integers(len(base), size=c)]
        out[i:i + c] = _normalise(x)
    return out


def uniform(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n i.i.d. Gaussian vectors, normalised (uniform on the unit sphere): no structure for a
    graph index to use, its worst case. float32 (n, d)."""
    out = np.empty((n, d), np.float32)
    for i in range(0, n, CHUNK):
        c = min(CHUNK, n - i)
        out[i:i + c] = _normalise(rng.standard_normal((c, d), dtype=np.float32))
    return out


def exact_topk(x: np.ndarray, q: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search of queries float32 (Q, D) in x float32 (N, D), QUERY_CHUNK
    queries at a time: ids int64 (Q, k) and scores float32 (Q, k), best first."""
    if len(x) < k:
        raise ValueError(f"top-{k} of {len(x)} vectors")
    ids = np.empty((len(q), k), np.int64)
    scores = np.empty((len(q), k), np.float32)
    for i in range(0, len(q), QUERY_CHUNK):
        s = q[i:i + QUERY_CHUNK] @ x.T  # (c, N)
        top = np.argpartition(s, -k, axis=1)[:, -k:]  # (c, k), unordered
        val = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-val, axis=1)
        ids[i:i + QUERY_CHUNK] = np.take_along_axis(top, order, axis=1)
        scores[i:i + QUERY_CHUNK] = np.take_along_axis(val, order, axis=1)
    return ids, scores


def _exact_one(x: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    """Exact top-k ids of one query float32 (D,): what a server does per request."""
    s = x @ q  # (N,)
    top = np.argpartition(s, -k)[-k:]
    return top[np.argsort(-s[top])]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of truth (Q, k) found in the same row of found (Q, k)."""
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


def _blas_threads(threads: int):
    """A context limiting numpy's BLAS to `threads` (threadpoolctl, when installed), so exact
    search gets the cores hnswlib gets; a no-op otherwise."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(threads, user_api="blas")


def _single(fn: Callable[[np.ndarray], object], q: np.ndarray, budget_s: float) -> dict:
    """Latency of fn on one query at a time, cycling through the rows of q (Q, D)."""
    rows = itertools.cycle(range(len(q)))
    return timed(lambda: fn(q[next(rows)]), warmup=3, min_reps=min(50, len(q)),
                 max_reps=200, budget_s=budget_s)


def _batch_qps(fn: Callable[[np.ndarray], object], q: np.ndarray, budget_s: float) -> float:
    """Queries per second of fn on all of q at once (median pass; a short warm-up on 8)."""
    fn(q[:8])
    return len(q) / (timed(lambda: fn(q), warmup=0, min_reps=1, max_reps=20,
                           budget_s=budget_s)["median_ms"] / 1e3)


def default_serve_ef() -> int:
    """The ef that VectorIndex.search uses when not given one, read off a one-item index (so
    the default lives in one place: VectorIndex.search)."""
    probe = VectorIndex(dim=1, max_elements=1)
    probe.add(np.ones((1, 1), np.float32), np.zeros(1, np.int64))
    probe.search(np.ones((1, 1), np.float32), k=1)
    return int(probe._index.ef)


def _one_run(distribution: str, n: int, x: np.ndarray, q: np.ndarray, efs: list[int],
             build: dict,
             threads: int, serve_ef: int, budget_s: float,
             progress: Callable[[str], object]) -> dict:
    tag = f"index: {distribution} {n}"
    d = x.shape[1]

    progress(f"{tag}: exact search ...")
    truth: dict[str, np.ndarray] = {}

    def exact_batch(qq: np.ndarray) -> None:
        truth["ids"] = exact_topk(x, qq)[0]

    with _blas_threads(threads):
        exact_single = _single(lambda v: _exact_one(x, v), q, budget_s)
        exact_qps = _batch_qps(exact_batch, q, budget_s)
    gt = truth["ids"]
    progress(f"{tag}: exact {exact_single['median_ms']:.3g} ms per query, "
             f"{exact_qps:,.0f} q/s batched")

    index = VectorIndex(d, n, **build)
    progress(f"{tag}: building (M {index.m}, ef_construction {index.ef_construction}, "
             f"{threads} threads) ...")
    index._index.set_num_threads(threads)
    t = time.perf_counter()
    index.add(x, np.arange(n, dtype=np.int64))
    build_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.bin"
        index._index.save_index(str(path))
        index_bytes = path.stat().st_size
    progress(f"{tag}: built in {build_s:.1f} s, {index_bytes / 2**20:.1f} MiB")

    hnsw = index._index
    sweep = []
    for ef in efs:
        hnsw.set_ef(ef)
        hnsw.set_num_threads(threads)
        found, _ = hnsw.knn_query(q, k=K)
        recall = recall_at_k(found, gt)
        hnsw.set_num_threads(1)
        single = _single(lambda v: hnsw.knn_query(v, k=K), q, budget_s)
        hnsw.set_num_threads(threads)
        qps = _batch_qps(lambda qq: hnsw.knn_query(qq, k=K), q, budget_s)
        row = {"ef": ef, "recall@10": recall, "single": single, "batch_qps": qps,
               "single_speedup": exact_single["median_ms"] / single["median_ms"],
               "batch_speedup": qps / exact_qps}
        sweep.append(row)
        progress(f"{tag}: ef {ef}: recall@10 {recall:.3f}, {single['median_ms']:.3g} ms "
                 f"(x{row['single_speedup']:.1f}), {qps:,.0f} q/s (x{row['batch_speedup']:.1f})")

    def brief(row: dict | None) -> dict | None:
        if row is None:
            return None
        return {key: row[key] for key in ("ef", "recall@10", "single_speedup", "batch_speedup")}

    best = next((r for r in sweep if r["recall@10"] >= TARGET_RECALL), None)
    serve = next(r for r in sweep if r["ef"] == serve_ef)
    return {"distribution": distribution, "n": n, "build_s": build_s,
            "index_bytes": index_bytes, "exact_bytes": n * d * 4,
            "exact": {"single": exact_single, "batch_qps": exact_qps},
            "sweep": sweep, "best": brief(best), "serve": brief(serve)}


def run(bundle: Path, sizes=(10_000, 100_000, 1_000_000), uniform_sizes=(10_000, 100_000),
        efs=(10, 20, 40, 80, 160, 320, 640, 1280), queries: int = 1000, threads: int = 2,
        serve_ef: int | None = None, seed: int = 0, m: int | None = None,
        ef_construction: int | None = None,
        progress: Callable[[str], object] = print, budget_s: float = 2.0) -> dict:
    """hnswlib (VectorIndex; its default M and ef_construction unless `m`, `ef_construction`
    are given) against exact numpy search.

    For "model" vectors (a Gaussian kernel density over the bundle's image embeddings, see
    `pick_sigma`) at each of `sizes`, and uniform ones at each of `uniform_sizes`: build time,
    index file size, and for each ef of `efs` plus `serve_ef` (default: the ef VectorIndex.search
    uses by default) recall@10 against exact search, one-query latency (hnswlib on one thread)
    and batched queries/s (`threads` threads), with the speed-ups over exact search. The
    "model" queries are perturbed caption embeddings: text queries looking for images. Exact
    search runs with numpy's BLAS limited to `threads` (when threadpoolctl is installed).
    `budget_s` bounds each timing loop. Returns a JSON-serialisable dict.
    """
    base = base_vectors(Path(bundle))
    d = base["images"].shape[1]
    sigma = pick_sigma(base["images"])
    serve_ef = default_serve_ef() if serve_ef is None else int(serve_ef)
    efs = sorted({int(e) for e in efs} | {serve_ef})
    build = {k: v for k, v in (("m", m), ("ef_construction", ef_construction)) if v}
    probe = VectorIndex(d, 1, **build)
    limited = importlib.util.find_spec("threadpoolctl") is not None
    result = {"dim": d, "threads": threads, "queries": queries, "sigma": sigma,
              "exact_threads": threads if limited else None,  # None: BLAS's own choice
              "gallery": {"images": len(base["images"]), "captions": len(base["captions"])},
              "M": probe.m, "ef_construction": probe.ef_construction, "serve_ef": serve_ef,
              "efs": efs, "runs": []}
    del probe
    progress(f"index: {d}-d, sigma {sigma:.4g} from {len(base['images'])} gallery images, "
             f"serve ef {serve_ef}")
    plan = [("model", n) for n in sizes] + [("uniform", n) for n in uniform_sizes]
    for i, (distribution, n) in enumerate(plan):
        rng = np.random.default_rng([seed, i])
        progress(f"index: {distribution} {n}: generating ...")
        if distribution == "model":
            x = model_like(base["images"], n, rng, sigma)
            q = model_like(base["captions"], queries, rng, sigma)
        else:
            x, q = uniform(n, d, rng), uniform(queries, d, rng)
        result["runs"].append(_one_run(distribution, n, x, q, efs, build, threads, serve_ef,
                                       budget_s, progress))
        del x, q
        gc.collect()  # the next size's vectors and index must not meet this one's
    return result


def table(result: dict) -> str:
    """Markdown: one summary row per (distribution, N), then the whole ef sweep."""
    mib = 2**20
    rows = []
    for r in result["runs"]:
        best, serve = r["best"] or {}, r["serve"]
        rows.append([r["distribution"], r["n"], r["build_s"], r["index_bytes"] / mib,
                     r["exact_bytes"] / mib, r["exact"]["single"]["median_ms"],
                     r["exact"]["batch_qps"], best.get("ef"), best.get("single_speedup"),
                     best.get("batch_speedup"), serve["recall@10"], serve["single_speedup"],
                     serve["batch_speedup"]])
    serve_ef = result["serve_ef"]
    summary_md = md_table(
        ["vectors", "N", "build s", "index MiB", "matrix MiB", "exact ms", "exact q/s",
         f"ef for recall≥{TARGET_RECALL}", "× 1 query", "× batch",
         f"recall@10 at ef {serve_ef}", "× 1 query", "× batch"], rows)
    rows = []
    for r in result["runs"]:
        for s in r["sweep"]:
            ef = f"{s['ef']} (served)" if s["ef"] == serve_ef else s["ef"]
            rows.append([r["distribution"], r["n"], ef, s["recall@10"], s["single"]["median_ms"],
                         s["single"]["p95_ms"], s["batch_qps"], s["single_speedup"],
                         s["batch_speedup"]])
    sweep_md = md_table(["vectors", "N", "ef", "recall@10", "ms median", "ms p95", "q/s",
                         "× 1 query", "× batch"], rows)
    head = (f"{result['dim']}-d, M {result['M']}, ef_construction {result['ef_construction']}, "
            f"{result['queries']} queries, {result['threads']} threads for batches and builds; "
            f"× = speed-up over exact numpy search.")
    return f"{head}\n\n{summary_md}\n\n{sweep_md}"


def plot(result: dict, path: Path) -> None:
    """PNG: recall@10 against one-query latency (log x), a line per run labelled with ef, one
    panel per distribution; the exact search's latency as a dashed vertical line per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    dists = list(dict.fromkeys(r["distribution"] for r in result["runs"]))
    fig, axes = plt.subplots(1, len(dists), figsize=(6 * len(dists), 4.5), squeeze=False)
    for ax, dist in zip(axes[0], dists):
        runs = [r for r in result["runs"] if r["distribution"] == dist]
        for color, r in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, runs):
            lat = [s["single"]["median_ms"] for s in r["sweep"]]
            rec = [s["recall@10"] for s in r["sweep"]]
            ax.plot(lat, rec, "o-", color=color, label=f"hnswlib N={r['n']:,}")
            for s, xv, yv in zip(r["sweep"], lat, rec):
                ax.annotate(str(s["ef"]), (xv, yv), textcoords="offset points", xytext=(3, -10),
                            fontsize=7, color=color)
            ax.axvline(r["exact"]["single"]["median_ms"], color=color, ls="--", lw=1,
                       label=f"exact N={r['n']:,}")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # ticks 0.01 0.02 0.05 ...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("one-query latency, median ms (log)")
        ax.set_ylabel("recall@10")
        ax.set_title(f"{dist} vectors, {result['dim']}-d (labels: ef)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
