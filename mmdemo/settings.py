"""Serving settings, in one place, each with the measurement behind it.

The figures are `python -m mmdemo.bench` on the 2-core CPU machine the README describes
(reports/bench/bench.json; the README's "Performance" section has the tables). Environment
variables override the ones a deployment may want to change.
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


# ONNX Runtime threads per session ($MMDEMO_ORT_THREADS; 0: ONNX Runtime's own choice, one per
# physical core). The bench compares ORT and PyTorch at this same count; on 2 cores both
# encoders are fastest with both cores at batch 1, and inter-op parallelism does not pay for
# graphs this sequential, so sessions run their nodes one after another.
ORT_THREADS = _int("MMDEMO_ORT_THREADS", 0)

# Requests one Gradio event handles at once. The bench's 8-client runs give about the same
# throughput as 1 client (ONNX Runtime already uses every core for one request), so a higher
# limit would only stretch each request's latency; 4 keeps a slow request (drawing 16 samples)
# from holding up quick searches, and the load test runs 16 clients against it.
CONCURRENCY = _int("MMDEMO_CONCURRENCY", 4)

# Requests that may wait beyond those; more are told at once that the app is busy.
QUEUE_SIZE = _int("MMDEMO_QUEUE_SIZE", 64)

# hnswlib's ef at query time (raised to k where k is larger). The bench's sweep on vectors
# drawn like the model's own gives recall@10 >= 0.99 from ef 40 at 100k vectors and 0.98 at
# 1M; 200 keeps a margin for galleries that grow past the bench's sizes, at well under a
# millisecond per query for galleries of the default's size.
INDEX_EF = _int("MMDEMO_INDEX_EF", 200)

# Images embedded per ONNX Runtime call when adding to the gallery. Batching gives the
# encoders' batch-32 throughput instead of their batch-1 latency per image, and 32 images
# bound the memory one upload holds at once.
ENCODE_BATCH = _int("MMDEMO_ENCODE_BATCH", 32)
