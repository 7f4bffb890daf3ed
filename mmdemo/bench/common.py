"""What every section of the benchmark shares: timing with warm-up excluded, markdown tables."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object], warmup: int = 3, min_reps: int = 5, max_reps: int = 200,
          budget_s: float = 3.0) -> dict:
    """Call fn `warmup` times untimed, then at least `min_reps` and at most `max_reps` times,
    stopping once `budget_s` seconds of timed calls have passed. Milliseconds per call."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps
                                     or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return summary(times)


def summary(times_ms: list[float]) -> dict:
    """median, p95, mean and count of latencies in milliseconds."""
    s = sorted(times_ms)
    p95 = s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]
    return {"median_ms": statistics.median(s), "p95_ms": p95,
            "mean_ms": statistics.fmean(s), "reps": len(s)}


def md_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 3 significant digits, None as an en dash."""

    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)
