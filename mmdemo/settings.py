"""Serving settings, in one place, each with the measurement behind it.

The figures are from `python -m mmdemo.bench` on the default bundle on this project's 2-core
CPU machine (reports/bench/bench.md has every table; the README's "Performance" section the
summary). Environment variables override each setting.
"""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"error: ${name} is {value!r}; expected a whole number") from None


# ONNX Runtime threads per session ($MMDEMO_ORT_THREADS; 0: ONNX Runtime's choice, one per
# physical core, 2 here). At batch 1 the default bundle's graphs take 0.1 to 1.3 ms on 2
# threads and about the same on 1 (image encoder 0.48 vs 0.69 ms, text encoder 0.45 vs
# 0.42 ms), while ResNet-50 and BERT-base gain from the second core (83 vs 90 ms, 55 vs 75
# ms): every core serves bigger encoders best and costs the small ones nothing. Nodes run one
# after another (no inter-op threads): these graphs are chains.
ORT_THREADS = _int("MMDEMO_ORT_THREADS", 0)

# Requests one Gradio event handles at once ($MMDEMO_CONCURRENCY). Through Gradio a search
# costs ~150-210 ms against 1-2 ms in the Engine; with 8 clients search_by_text served 11.9
# calls/s at p50 656 ms: the server's own work, not the models, bounds throughput, so more
# concurrency would only lengthen each request. 4 keeps one slow request (drawing 16 samples)
# from holding up quick searches; the load test runs 16 clients against it with no failure.
CONCURRENCY = _int("MMDEMO_CONCURRENCY", 4)

# Requests that may wait beyond those ($MMDEMO_QUEUE_SIZE); more are told at once that the app
# is busy rather than left to time out (at ~8 calls/s, 64 waiting is ~8 s of work).
QUEUE_SIZE = _int("MMDEMO_QUEUE_SIZE", 64)

# hnswlib's ef at query time ($MMDEMO_INDEX_EF; raised to k where k is larger). On vectors
# drawn like the model's own: recall@10 1.000 at 10k, 0.999 at 100k (0.26 ms a query, 7.5x
# exact search) and 0.935 at 1M (0.59 ms, 43x). The default gallery (1000 images, 5000
# captions) is below 10k, where ef 200 finds every true top 10; recall stays above 0.99 up to
# ~100k items, and a gallery of 1M would want ef 640 for 0.986 (0.99 ms a query, 26x).
INDEX_EF = _int("MMDEMO_INDEX_EF", 200)

# Images embedded per ONNX Runtime call when adding to the gallery ($MMDEMO_ENCODE_BATCH).
# The image encoder embeds 3,260 images/s at batch 32 against ~2,100/s one at a time
# (0.48 ms each), and 32 images bound what one upload holds in memory at once.
ENCODE_BATCH = _int("MMDEMO_ENCODE_BATCH", 32)

# What one upload to the app may add ($MMDEMO_REQUEST_IMAGES, $MMDEMO_REQUEST_MEGAPIXELS; the
# CLI has no such limit). Images are decoded one at a time, so these bound an upload's time,
# not its memory (reports/reliability.json, upload_limits: 1000 small images in 5.1 s, ten
# 40-megapixel PNGs, the most one image may have, in 4.8 s, within +85 MB of memory).
REQUEST_IMAGES = _int("MMDEMO_REQUEST_IMAGES", 1000)
REQUEST_MEGAPIXELS = _int("MMDEMO_REQUEST_MEGAPIXELS", 400)
