"""Load: 16 gradio_client clients send mixed requests to one app for 60 seconds (loopback only,
bounded in time and in requests, stops by itself). No request may fail, and the server's memory
may grow by less than 100 MB. Past the queue's size, a request is told at once that the app is
busy, rather than left to time out."""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, copy_bundle, serve_app
from tests.report import record

pytestmark = pytest.mark.slow
CLIENTS = 16
SECONDS = float(os.environ.get("MMDEMO_LOAD_SECONDS", 60))
MAX_REQUESTS = 50_000  # a second bound, whatever the speed


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _requests(handle_file):
    scene = [handle_file(str(p)) for p in sorted((ROOT / "examples").glob("scene_*.png"))]
    texts = ["a red circle", "a small blue square left of a large yellow star",
             "what color is the square?", "is there a star?", "how many red shapes are there?"]
    return [
        ("search_by_text", lambda r: (r.choice(texts), 12)),
        ("search_by_image", lambda r: (r.choice(scene), 12)),
        ("search_captions", lambda r: (r.choice(scene), 10)),
        ("search_composed", lambda r: (r.choice(scene), r.choice(texts), 0.5, 12)),
        ("classify", lambda r: (r.choice(scene), r.choice(texts[2:]), "cross_attention", 0.5)),
    ]


def test_sixteen_clients_for_a_minute(tiny_bundle, tmp_path):
    from gradio_client import Client, handle_file

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    with serve_app(bundle, tmp_path) as (url, _, proc):
        kinds = _requests(handle_file)
        # the server is under test: results are not downloaded (a browser fetches thumbnails
        # lazily, and 16 clients downloading in one Python process would measure the clients)
        clients = [Client(url, verbose=False, download_files=False) for _ in range(CLIENTS)]
        for api, args in kinds:  # warm up every endpoint once before the baseline
            clients[0].predict(*args(random.Random(0)), api_name=f"/{api}")
        rss0 = _rss_mb(proc.pid)
        stop_at = time.time() + SECONDS
        lock = threading.Lock()
        lat: dict[str, list[float]] = {api: [] for api, _ in kinds}
        failures: list[str] = []
        served = [0]
        per_client = [0] * CLIENTS

        def worker(n: int) -> None:
            rng = random.Random(n)
            c = clients[n]
            while time.time() < stop_at:
                with lock:
                    if served[0] >= MAX_REQUESTS:
                        return
                    served[0] += 1
                api, args = rng.choice(kinds)
                t0 = time.perf_counter()
                try:
                    out = c.predict(*args(rng), api_name=f"/{api}")
                    assert out is not None
                except Exception as e:  # noqa: BLE001 (every failure is counted)
                    with lock:
                        failures.append(f"{api}: {type(e).__name__}: {e}")
                    continue
                with lock:
                    lat[api].append(time.perf_counter() - t0)
                    per_client[n] += 1

        peak = [rss0]

        def sample() -> None:
            while time.time() < stop_at:
                peak[0] = max(peak[0], _rss_mb(proc.pid))
                time.sleep(1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.time()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(worker, range(CLIENTS)))
        wall = time.time() - t0
        sampler.join()
        rss1 = _rss_mb(proc.pid)
        assert proc.poll() is None
    all_lat = np.array([x for v in lat.values() for x in v]) * 1000
    per = {api: {"requests": len(v), "p50_ms": round(float(np.percentile(v, 50)) * 1000, 1),
                 "p95_ms": round(float(np.percentile(v, 95)) * 1000, 1)}
           for api, v in lat.items() if v}
    figures = {"clients": CLIENTS, "seconds": round(wall, 1), "requests": int(len(all_lat)),
               "failed": len(failures), "requests_per_second": round(len(all_lat) / wall, 1),
               "p50_ms": round(float(np.percentile(all_lat, 50)), 1),
               "p95_ms": round(float(np.percentile(all_lat, 95)), 1),
               "server_rss_mb_start": round(rss0, 1), "server_rss_mb_end": round(rss1, 1),
               "server_rss_mb_peak": round(peak[0], 1),
               "memory_growth_mb": round(rss1 - rss0, 1), "per_endpoint": per,
               "requests_per_client_min_max": [min(per_client), max(per_client)]}
    record("load", figures)
    assert not failures, failures[:5]
    assert min(per_client) >= 1, per_client  # every client was served, none starved
    assert rss1 - rss0 < 100, figures


def test_overload_is_told_to_retry(tiny_bundle, tmp_path):
    """With room for 2 waiting requests, a burst of 24 gets 'queue is full' answers at once."""
    from gradio_client import Client

    with serve_app(tiny_bundle, tmp_path, env={"MMDEMO_QUEUE_SIZE": "2"}) as (url, _, proc):
        clients = [Client(url, verbose=False) for _ in range(24)]

        def one(c):
            t0 = time.perf_counter()
            try:
                c.predict("a red circle " * 20, 50, api_name="/search_by_text")
                return "ok", time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 (the kind of refusal is checked below)
                return f"{type(e).__name__}: {e}", time.perf_counter() - t0

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, clients))
        busy = [r for r in results if r[0] != "ok"]
        assert busy and all("Queue is full" in r[0] and "try again" in r[0] for r in busy), busy
        assert sum(r[0] == "ok" for r in results) >= 2
        assert max(t for _, t in busy) < 30  # refused promptly, not timed out
        assert len(Client(url, verbose=False).predict("a red circle", 3,
                                                      api_name="/search_by_text")) == 3
    record("overload", {"burst": 24, "queue_size": 2, "served": len(results) - len(busy),
                        "told_busy": len(busy),
                        "slowest_refusal_s": round(max(t for _, t in busy), 2),
                        "message": busy[0][0]})
