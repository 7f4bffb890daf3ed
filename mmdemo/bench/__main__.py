"""python -m mmdemo.bench --bundle B --out DIR: measure a bundle side by side, in one run.

Sections (all by default, or those named with --sections):
  models     each ONNX graph of the bundle on ONNX Runtime against its PyTorch original from the
             run folders (--runs), batch 1 latency and batch 32 throughput, same threads
  reference  the same for ResNet-50 at 224 px and BERT-base (randomly initialised, nothing
             downloaded): the sizes users know, beside the small default networks
  variants   ONNX Runtime's options: graphs optimised offline, dynamic int8 with its cost on
             the task metric, fp16 with IO binding on CUDA (where CUDA loads)
  index      hnswlib against exact search at 10k, 100k and 1M vectors drawn like the bundle's
             own embeddings (and uniform ones, the worst case), over an ef sweep
  serving    every endpoint through gradio_client with 1 and 8 clients, beside the Engine's own
             latency for the same calls
  start      app start with the bundle in place, Python's and Gradio's share of it, and the
             default bundle's build time (from --runs/build_times.json)

Writes DIR/bench.json, DIR/bench.md and PNG plots, and prints the tables. torch is imported
only for the PyTorch side of `models` and `reference`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SECTIONS = ("models", "reference", "variants", "index", "serving", "start")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(float(v)) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas"
                                         ) from None


def machine() -> dict:
    import onnxruntime as ort

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip()
                   for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version(), "onnxruntime": ort.__version__}
    for name in ("torch", "gradio", "hnswlib", "numpy"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(),
            "system": platform.platform(), "versions": versions,
            "providers": ort.get_available_providers()}


def targets(result: dict) -> list[dict]:
    """The issue's targets for this 2-core CPU, each with the figure that meets it or not."""
    out = []
    s = result["sections"]

    def add(name: str, value, limit: float, higher: bool) -> None:
        met = None if value is None else (value >= limit if higher else value <= limit)
        out.append({"target": name, "value": value, "limit": limit, "met": met})

    for role in ("image_encoder", "text_encoder"):
        add(f"{role} b1: ORT over PyTorch", s.get("models", {}).get(role, {}).get("speedup_b1"),
            1.5, True)
    for name in ("resnet50_224", "bert_base"):
        add(f"{name} b1: ORT over PyTorch",
            s.get("reference", {}).get(name, {}).get("speedup_b1"), 1.5, True)
    runs = [r for r in s.get("index", {}).get("runs", [])
            if r["distribution"] == "model" and r["n"] >= 1_000_000]
    best = runs[0]["best"] if runs and runs[0].get("best") else None
    add("hnswlib at 1M over exact search, one query, recall@10 >= 0.98",
        best["single_speedup"] if best else None, 50, True)
    ends = s.get("serving", {}).get("endpoints", {}).get("search_by_text")
    add("search_by_text at the Engine, median ms",
        ends["engine"]["median_ms"] if ends else None, 15, False)
    add("search_by_text through Gradio (its HTTP API), 1 client, p50 ms",
        (ends.get("http") or {}).get("p50_ms") if ends else None, 60, False)
    add("search_by_text through Gradio (gradio_client), 1 client, p50 ms",
        ends["gradio"]["1"]["p50_ms"] if ends else None, 60, False)
    start = s.get("start", {}).get("app_start_s")
    add("app start with a bundle, s", start, 15, False)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mmdemo.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="the bundle folder to measure")
    p.add_argument("--out", type=Path, required=True, help="where to write the results")
    p.add_argument("--runs", type=Path, default=None,
                   help="the build's work folder (run/, fusion/, captioner/, generator/, as "
                        "app.py leaves runs/default): PyTorch originals and fusion labels")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated, from {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for ONNX Runtime and PyTorch alike (default: every core)")
    p.add_argument("--budget", type=float, default=3.0,
                   help="seconds of timed calls per measurement (default 3)")
    p.add_argument("--reference-size", choices=("full", "small"), default="full",
                   help="reference networks: ResNet-50 at 224 px and BERT-base (full), or "
                        "ResNet-18 at 64 px and a 2-layer BERT (small, for a quick check)")
    p.add_argument("--task-images", type=int, default=300,
                   help="gallery images the int8 variants are scored on (default 300)")
    p.add_argument("--index-sizes", type=_ints, default=(10_000, 100_000, 1_000_000))
    p.add_argument("--uniform-sizes", type=_ints, default=(10_000, 100_000))
    p.add_argument("--efs", type=_ints, default=(10, 20, 40, 80, 160, 320, 640, 1280))
    p.add_argument("--index-m", type=int, default=None,
                   help="hnswlib M of the indexes built (default: the app's, mmdemo.index)")
    p.add_argument("--index-ef-construction", type=int, default=None,
                   help="hnswlib ef_construction (default: the app's)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--calls", type=int, default=30, help="calls per client and endpoint")
    p.add_argument("--clients", type=_ints, default=(1, 8))
    p.add_argument("--start-repeats", type=int, default=3)
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not (args.bundle / "manifest.json").is_file():
        p.error(f"{args.bundle} is not a bundle (no manifest.json)")
    if args.runs is not None and not (args.runs / "run").is_dir():
        p.error(f"--runs {args.runs}: no run/ folder in it")
    if ("reference" in sections or "models" in sections and args.runs) and not _has_torch():
        p.error("the models and reference sections compare against PyTorch: install torch, "
                "or leave them out with --sections")
    args.out.mkdir(parents=True, exist_ok=True)

    def progress(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    from mmdemo import settings
    from mmdemo.bench import models as bm
    from mmdemo.engine import Engine

    result = {"bundle": str(args.bundle), "threads": args.threads, "machine": machine(),
              "settings": {k: getattr(settings, k) for k in (
                  "ORT_THREADS", "CONCURRENCY", "QUEUE_SIZE", "INDEX_EF", "ENCODE_BATCH")},
              "sections": {}}
    s = result["sections"]
    tables = []

    def save() -> None:  # after each section: a run stopped later keeps what it measured
        (args.out / "bench.json").write_text(json.dumps(result, indent=2))

    engine = Engine.load(args.bundle, ["CPUExecutionProvider"])
    if "models" in sections:
        s["models"] = bm.compare(engine, args.runs, args.threads, args.budget, progress)
        save()
    if "reference" in sections:
        s["reference"] = bm.reference(args.out / "reference", args.threads, args.budget,
                                      progress, args.reference_size)
        save()
    if "models" in s or "reference" in s:
        tables.append("## Models\n\n" + bm.models_table(s.get("models", {}),
                                                        s.get("reference", {}), args.threads))
    if "variants" in sections:
        s["variants"] = bm.variants(engine, args.out, args.runs, args.threads, args.budget,
                                    args.task_images, progress, s.get("reference"))
        save()
        tables.append("## Variants\n\n" + bm.variants_table(s["variants"]))
    del engine
    if "index" in sections:
        from mmdemo.bench import index as bi

        s["index"] = bi.run(args.bundle, args.index_sizes, args.uniform_sizes, args.efs,
                            args.queries, args.threads, settings.INDEX_EF, progress=progress,
                            m=args.index_m, ef_construction=args.index_ef_construction)
        save()
        tables.append("## Index\n\n" + bi.table(s["index"]))
        bi.plot(s["index"], args.out / "index.png")
    if "serving" in sections or "start" in sections:
        from mmdemo.bench import serving as bs

        ends = cold = None
        if "serving" in sections:
            ends = s["serving"] = bs.endpoints(args.bundle, args.calls, args.clients,
                                               progress=progress)
        if "start" in sections:
            cold = s["start"] = bs.cold_start(args.bundle, args.start_repeats,
                                              progress=progress)
            build = args.runs / "build_times.json" if args.runs else None
            if build is not None and build.is_file():
                cold["default_build"] = json.loads(build.read_text())
        tables.append("## Serving\n\n" + bs.table(cold, ends))
    if "models" in s or "reference" in s:
        plot_models(s.get("models", {}), s.get("reference", {}), args.out / "models.png")
    result["targets"] = targets(result)
    from mmdemo.bench.common import md_table

    tables.append("## Targets\n\n" + md_table(
        ["target", "value", "limit", "met"],
        [[t["target"], t["value"], t["limit"], {True: "yes", False: "**no**"}.get(t["met"], "–")]
         for t in result["targets"]]))
    header = (f"# Benchmark of {args.bundle.name}\n\n{result['machine']['cpu']}, "
              f"{result['machine']['cores']} cores, {args.threads} threads; "
              + ", ".join(f"{k} {v}" for k, v in result["machine"]["versions"].items()))
    text = header + "\n\n" + "\n\n".join(tables) + "\n"
    (args.out / "bench.json").write_text(json.dumps(result, indent=2))
    (args.out / "bench.md").write_text(text)
    print(text)
    return result


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def plot_models(models: dict, refs: dict, path: Path) -> None:
    """Batch-1 latency of PyTorch and ONNX Runtime per network (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, r) for n, r in {**refs, **models}.items() if "torch" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["torch"]["b1"]["median_ms"] for _, r in rows], 0.4,
           label="PyTorch eager")
    ax.bar([i + 0.2 for i in x], [r["ort"]["b1"]["median_ms"] for _, r in rows], 0.4,
           label="ONNX Runtime")
    ax.set_xticks(list(x), [n for n, _ in rows], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("batch-1 latency, ms (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
