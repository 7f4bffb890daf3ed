"""ONNX Runtime against PyTorch on the same networks in the same process, and ONNX Runtime's
variants: graphs optimised offline, dynamic int8 quantisation, fp16 with IO binding on CUDA.

Only `compare` and `reference` import torch (the PyTorch side of the comparison); the variants
run on ONNX Runtime alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mmdemo.bench.common import md_table, summary, timed
from mmdemo.engine import (
    CPU,
    CUDA,
    Engine,
    cpu_fingerprint,
    open_session,
    optimize_for_cpu,
    session_options,
)
from mmdemo.preprocess import preprocess

BATCH = 32  # the throughput batch
QUERY = "a small red circle left of a large blue square"
MAX_INT8_LOSS = 0.01  # int8 is used only where the task metric loses at most 1 point
MIN_INT8_SPEEDUP = 1.2  # and where batch 1 is this much faster (less is within the noise)
ENCODERS = ("image_encoder", "text_encoder")

Progress = Callable[[str], None]


def session(path: Path, threads: int, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            providers: list[str] | None = None) -> ort.InferenceSession:
    opts = session_options(level)
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or [CPU])


def example_images(n: int) -> list[np.ndarray]:
    """n gallery-like scenes: the repository's example images, repeated."""
    from PIL import Image

    folder = Path(__file__).resolve().parents[2] / "examples"
    files = sorted(folder.glob("scene_*.png"))
    ims = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return [ims[i % len(ims)] for i in range(n)]


def bundle_inputs(engine: Engine, role: str, batch: int) -> dict[str, np.ndarray]:
    """Realistic inputs of `role`'s graph at `batch`: example scenes, a caption as the tokenizer
    gives it, the caption decoder's state after its first step, a prompt's text embedding."""
    info = engine.manifest["models"][role]
    names = [v["name"] for v in info["inputs"]]
    rng = np.random.default_rng(0)
    images = preprocess(example_images(batch), engine.spec)
    feeds: dict[str, np.ndarray] = {}
    if "image" in names:
        feeds["image"] = images
    if "input_ids" in names:
        feeds["input_ids"], feeds["attention_mask"] = engine.tokenizer([QUERY] * batch)
    if "a" in names:
        feeds["a"] = np.full(batch, 0.5, np.float32)
    if role == "caption_step":
        memory, hidden = engine.sessions["caption_start"].run(["memory", "hidden"],
                                                              {"image": images})
        feeds.update(token=np.full(batch, engine.captioning["bos_id"], np.int64),
                     hidden=hidden, memory=memory)
    if "text_embedding" in names:
        feeds["text_embedding"] = np.repeat(engine.encode_texts([QUERY]), batch, 0)
    if "z" in names:
        zdim = next(v["shape"][1] for v in info["inputs"] if v["name"] == "z")
        feeds["z"] = rng.standard_normal((batch, zdim)).astype(np.float32)
    missing = set(names) - set(feeds)
    if missing:
        raise ValueError(f"{role}: no bench inputs for {sorted(missing)}")
    return {n: feeds[n] for n in names}


def reference_inputs(spec: dict, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name, (shape, dtype) in spec.items():
        if name == "attention_mask":
            out[name] = np.ones((batch, *shape), dtype)
        elif dtype == "int64":
            out[name] = rng.integers(1000, 2000, (batch, *shape)).astype(dtype)
        else:
            out[name] = rng.standard_normal((batch, *shape)).astype(dtype)
    return out


def interleaved(fns: dict[str, Callable[[], object]], warmup: int = 2, rounds: int = 5,
                budget_s: float = 3.0, max_per_round: int = 40) -> dict[str, dict]:
    """Time several callables side by side: after `warmup` untimed calls of each, `rounds`
    rounds in which each callable runs a few times in turn, so that a machine whose speed
    drifts (a shared VM) slows all of them alike and their ratio stays fair. Milliseconds per
    call, as `timed`."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    one = {}
    for k, fn in fns.items():
        for _ in range(warmup):
            fn()
        t = time.perf_counter()
        fn()
        one[k] = time.perf_counter() - t
    per_round = max(1, min(max_per_round, int(budget_s / rounds / max(sum(one.values()), 1e-6))))
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: summary(v) for k, v in times.items()}


def _pair(name: str, run_ort: Callable, run_torch: Callable | None, feeds: Callable,
          budget_s: float, progress: Progress) -> dict:
    """b1 latency and b32 throughput of ORT and (where given) PyTorch, timed interleaved, and
    their ratios."""
    progress(f"models: {name}")
    f1, f32 = feeds(1), feeds(BATCH)
    sides = {"ort": run_ort} if run_torch is None else {"ort": run_ort, "torch": run_torch}
    b1 = interleaved({k: (lambda r=r: r(f1)) for k, r in sides.items()}, budget_s=budget_s)
    b32 = interleaved({k: (lambda r=r: r(f32)) for k, r in sides.items()}, warmup=1,
                      rounds=3, budget_s=budget_s)
    out = {k: {"b1": b1[k], f"b{BATCH}": {**b32[k], "items_per_s": BATCH * 1e3
                                          / b32[k]["median_ms"]}} for k in sides}
    if run_torch is not None:
        ref, got = run_torch(f1), run_ort(f1)
        out["max_abs_diff"] = float(max(np.abs(np.asarray(a, np.float32) - b).max()
                                        for a, b in zip(ref, got)))
        out["speedup_b1"] = out["torch"]["b1"]["median_ms"] / out["ort"]["b1"]["median_ms"]
        out[f"speedup_b{BATCH}"] = (out["ort"][f"b{BATCH}"]["items_per_s"]
                                    / out["torch"][f"b{BATCH}"]["items_per_s"])
    return out


def _torch_runner(module, names: list[str]) -> Callable:
    import torch

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*[torch.from_numpy(feeds[n]) for n in names])
        out = out if isinstance(out, tuple) else (out,)
        return [o.numpy() for o in out]

    return run


def compare(engine: Engine, work: Path | None, threads: int, budget_s: float,
            progress: Progress) -> dict:
    """Every model of the bundle on ONNX Runtime (CPU, level ALL) and, where `work` holds its
    runs, on PyTorch eager from them, both with `threads` threads."""
    originals = {}
    if work is not None:
        import torch

        from export.originals import bundle_originals

        torch.set_num_threads(threads)
        originals = bundle_originals(work, engine.manifest)
    out = {}
    for role, info in engine.manifest["models"].items():
        sess = session(engine.root / info["file"], threads)
        names = [v["name"] for v in info["inputs"]]
        mod = originals.get(role)
        out[role] = _pair(role, lambda f, s=sess: s.run(None, f),
                          _torch_runner(mod, names) if mod is not None else None,
                          lambda b, r=role: bundle_inputs(engine, r, b), budget_s, progress)
    return out


def reference(folder: Path, threads: int, budget_s: float, progress: Progress,
              size: str = "full") -> dict:
    """ResNet-50 (224 px) and BERT-base (32 tokens), randomly initialised, exported here: ORT
    (level ALL) against PyTorch eager. Returns {name: figures} and keeps the graphs in folder."""
    import torch

    from export.originals import reference_nets

    torch.set_num_threads(threads)
    progress("models: exporting ResNet-50 and BERT-base (once) ...")
    nets = reference_nets(folder, size)
    out = {}
    for name, net in nets.items():
        names = list(net["inputs"])
        sess = session(net["onnx"], threads)
        out[name] = _pair(name, lambda f, s=sess: s.run(None, f),
                          _torch_runner(net["module"], names),
                          lambda b, n=net: reference_inputs(n["inputs"], b), budget_s, progress)
        if "onnx_plain" in net:  # before ONNX Runtime's transformer fusions, for comparison
            plain = session(net["onnx_plain"], threads)
            f1 = reference_inputs(net["inputs"], 1)
            out[name]["ort_unfused"] = {"b1": timed(lambda s=plain, f=f1: s.run(None, f),
                                                    budget_s=budget_s)}
        out[name]["onnx"] = str(net["onnx"])
        out[name]["onnx_plain"] = str(net.get("onnx_plain", net["onnx"]))
        out[name]["inputs"] = {k: [list(shape), dtype] for k, (shape, dtype)
                               in net["inputs"].items()}
    return out


# ------------------------------------------------------------------------------ variants


def _create_s(fn: Callable[[], ort.InferenceSession], reps: int = 3) -> tuple[float, object]:
    best, sess = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        sess = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, sess


def recall_at_10(img: np.ndarray, txt: np.ndarray, owner: np.ndarray) -> dict[str, float]:
    """Text-to-image and image-to-text Recall@10 by exact search; owner[j]: caption j's image."""
    sims = txt @ img.T
    top = np.argpartition(-sims, 10, axis=1)[:, :10]
    t2i = float((top == owner[:, None]).mean() * 10)
    top_c = np.argpartition(-sims.T, 10, axis=1)[:, :10]
    i2t = float(np.mean([np.any(owner[row] == i) for i, row in enumerate(top_c)]))
    return {"t2i_R@10": t2i, "i2t_R@10": i2t}


class TaskMetrics:
    """The bundle's task metrics through any session of a role: Recall@10 for the encoders,
    attribute F1 for the caption decoder (the oracle grades greedy captions), accuracy for
    the fusion models (where `work` holds the task's labels)."""

    def __init__(self, engine: Engine, work: Path | None, images: int):
        from PIL import Image

        self.engine = engine
        items = sorted(engine.gallery.values(), key=lambda it: int(it["id"]))[:images]
        self.raw = [np.asarray(Image.open(engine.root / it["file"]).convert("RGB"))
                    for it in items]
        self.x = preprocess(self.raw, engine.spec)
        self.texts = [c for it in items for c in it["captions"]]
        self.owner = np.array([i for i, it in enumerate(items) for _ in it["captions"]])
        self.work, self._fusion, self._scenes = work, None, None

    def _encode(self, role: str, sess: ort.InferenceSession) -> np.ndarray:
        if role == "image_encoder":
            return np.concatenate([sess.run(None, {"image": self.x[i:i + 256]})[0]
                                   for i in range(0, len(self.x), 256)])
        out = []
        for i in range(0, len(self.texts), 256):
            ids, mask = self.engine.tokenizer(self.texts[i:i + 256])
            out.append(sess.run(None, {"input_ids": ids, "attention_mask": mask})[0])
        return np.concatenate(out)

    def score(self, role: str, sessions: dict[str, ort.InferenceSession]) -> dict | None:
        """{metric: value} with `sessions` standing in for the bundle's own; None where no
        task metric applies."""
        if role in ENCODERS:
            img = self._encode("image_encoder", sessions["image_encoder"])
            txt = self._encode("text_encoder", sessions["text_encoder"])
            r = recall_at_10(img, txt, self.owner)
            return {**r, "metric": "R@10 (mean of both ways)",
                    "value": (r["t2i_R@10"] + r["i2t_R@10"]) / 2}
        if role in ("caption_start", "caption_step"):
            from mmdemo.decoding import Captioner
            from mmdemo.oracle import attribute_scores, parse_scene

            if self._scenes is None:
                self._scenes = [parse_scene(im) for im in self.raw]
            c = self.engine.captioning
            cap = Captioner(sessions["caption_start"], sessions["caption_step"], c["bos_id"],
                            c["eos_id"], c["max_length"])
            hyps = []
            for i in range(0, len(self.x), 256):
                hyps += cap.decode(self.x[i:i + 256], "greedy")
            texts = self.engine.tokenizer.decode([h.tokens for h in hyps])
            f1 = attribute_scores(texts, self._scenes)["mention_f1"]
            return {"metric": "attribute F1 (greedy)", "value": f1}
        if role.startswith("fusion_") and self.work is not None:
            return self._fusion_accuracy(role, sessions[role])
        return None

    def _fusion_accuracy(self, role: str, sess: ort.InferenceSession) -> dict:
        from export.fusion import run_ort, task_split
        from training.data.transforms import load_images
        from training.evaluate import task_metrics
        from training.train_fusion import load_fusion

        method = self.engine.manifest["models"][role]["method"]
        if self._fusion is None:
            _, fmeta = load_fusion(self.work / "fusion" / method)
            tasks = task_split(fmeta, self.engine.manifest["train_config"], None,
                               self.engine.manifest["gallery"]["split"])
            images = load_images(tasks.paths(), self.engine.spec, "task images").numpy()
            self._fusion = (tasks, images)
        tasks, images = self._fusion
        m = task_metrics(run_ort(sess, method, tasks, images, self.engine.tokenizer), tasks)
        key = "accuracy" if "accuracy" in m else "mAP"
        return {"metric": key, "value": float(m[key])}


def variants(engine: Engine, out_dir: Path, work: Path | None, threads: int, budget_s: float,
             images: int, progress: Progress, references: dict | None = None) -> dict:
    """For every model: session start and batch-1 latency with the graph optimised as it loads
    (level ALL) and optimised offline (the bundle's <name>.cpu.onnx, opened with nothing left
    to do); batch-1 latency on one thread instead of `threads`; dynamic int8 quantisation
    with its latency and its cost on the task metric; fp16 with IO binding where CUDA loads."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tasks = TaskMetrics(engine, work, images)
    qdir = out_dir / "int8"
    qdir.mkdir(parents=True, exist_ok=True)
    here = cpu_fingerprint()
    models = {r: (engine.root / i["file"], i, bundle_inputs(engine, r, 1))
              for r, i in engine.manifest["models"].items()}
    for name, net in (references or {}).items():
        models[name] = (Path(net["onnx"]), None, None)
    base_scores: dict[str, dict | None] = {}
    out = {}
    for role, (path, info, feeds) in models.items():
        progress(f"variants: {role}")
        if feeds is None:  # a reference net
            feeds = reference_inputs(references[role]["inputs"], 1)
        online_ms, s_on = _create_s(lambda p=path: session(p, threads))
        opt = (info or {}).get("cpu_optimized")
        if opt and {k: opt.get(k) for k in here} == here:
            opt_path, source = engine.root / opt["file"], "bundle"
        else:
            opt_path, source = out_dir / "optimized" / f"{role}.cpu.onnx", "made by the bench"
            opt_path.parent.mkdir(parents=True, exist_ok=True)
            if not opt_path.is_file():
                optimize_for_cpu(path, opt_path)
        off_ms, s_off = _create_s(lambda p=opt_path: session(
            p, threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
        runs = {"online_all": s_on, "offline_all": s_off, "one_thread": session(path, 1)}
        qpath = qdir / f"{role}.int8.onnx"
        quant_error = None
        try:
            if not qpath.is_file():
                # the graph before ONNX Runtime's own fused operators, which it cannot read
                src = Path((references or {}).get(role, {}).get("onnx_plain", path))
                quantize_dynamic(str(src), str(qpath), weight_type=QuantType.QInt8)
            runs["int8"] = session(qpath, threads)
        except Exception as e:  # an op the quantiser or the CPU provider cannot take
            quant_error = f"{type(e).__name__}: {e}"[:300]
        b1 = interleaved({k: (lambda s=s, f=feeds: s.run(None, f)) for k, s in runs.items()},
                         budget_s=budget_s)
        row: dict = {"online_all": {"create_ms": online_ms, "b1": b1["online_all"]},
                     "offline_all": {"create_ms": off_ms, "source": source,
                                     "b1": b1["offline_all"]},
                     "one_thread": {"b1": b1["one_thread"]}}
        if quant_error is not None:
            row["int8"] = {"error": quant_error}
        else:
            s_q = runs["int8"]
            row["int8"] = {"b1": b1["int8"],
                           "size_ratio": qpath.stat().st_size / path.stat().st_size,
                           "speedup_b1": b1["online_all"]["median_ms"] / b1["int8"]["median_ms"]}
            if info is not None:
                sessions = dict(engine.sessions)
                if role not in base_scores:
                    base_scores[role] = tasks.score(role, sessions)
                base = base_scores[role]
                if base is not None:
                    got = tasks.score(role, {**sessions, role: s_q})
                    loss = base["value"] - got["value"]
                    row["int8"].update(metric=base["metric"], fp32=base["value"],
                                       value=got["value"], loss=loss)
                    row["int8"]["use"] = bool(loss <= MAX_INT8_LOSS and row["int8"][
                        "speedup_b1"] >= MIN_INT8_SPEEDUP)
        row["fp16_cuda"] = fp16_cuda(path, feeds, budget_s)
        out[role] = row
    return out


def fp16_cuda(path: Path, feeds: dict[str, np.ndarray], budget_s: float) -> dict:
    """fp32 and fp16 on the CUDA provider with inputs and outputs bound on the device; skipped
    (with the reason) where CUDA does not load."""
    if CUDA not in ort.get_available_providers():
        return {"skipped": "this onnxruntime has no CUDA provider"}
    if open_session(path).get_providers()[0] != CUDA:  # tries CUDA once, quietly
        return {"skipped": "the CUDA provider did not load (no usable GPU here)"}
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = path.with_name(path.stem + ".fp16.onnx")
    if not half.is_file():
        onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(half))
    out = {}
    for name, p in (("fp32", path), ("fp16", half)):
        s = ort.InferenceSession(str(p), providers=[CUDA, CPU])
        binding = s.io_binding()
        for k, v in feeds.items():
            binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
        for o in s.get_outputs():
            binding.bind_output(o.name, "cuda")

        def run(s=s, b=binding):
            s.run_with_iobinding(b)

        out[name] = {"b1": timed(run, budget_s=budget_s)}
    return out


# ------------------------------------------------------------------------------ tables


def models_table(models: dict, refs: dict, threads: int) -> str:
    """Markdown: ORT against PyTorch per network (reference nets first)."""
    rows = []
    for name, r in {**refs, **models}.items():
        o, t = r["ort"], r.get("torch")
        rows.append([name, t["b1"]["median_ms"] if t else None, o["b1"]["median_ms"],
                     o["b1"]["p95_ms"], r.get("speedup_b1"),
                     t[f"b{BATCH}"]["items_per_s"] if t else None,
                     o[f"b{BATCH}"]["items_per_s"], r.get(f"speedup_b{BATCH}")])
    return (f"ONNX Runtime (CPU, level ALL) against PyTorch eager, {threads} threads each, "
            "same process, warm-up excluded\n\n"
            + md_table(["model", "PyTorch b1 ms", "ORT b1 ms", "ORT b1 p95 ms",
                        "speed-up b1", f"PyTorch b{BATCH} items/s", f"ORT b{BATCH} items/s",
                        f"speed-up b{BATCH}"], rows))


def variants_table(var: dict) -> str:
    """Markdown: the ONNX Runtime variants of every network."""
    rows = []
    for name, v in var.items():
        q = v.get("int8", {})
        rows.append([name, v["online_all"]["create_ms"], v["offline_all"]["create_ms"],
                     v["online_all"]["b1"]["median_ms"], v["offline_all"]["b1"]["median_ms"],
                     v["one_thread"]["b1"]["median_ms"],
                     q.get("b1", {}).get("median_ms"), q.get("metric"), q.get("fp32"),
                     q.get("value"), {True: "yes", False: "no"}.get(
                         q.get("use"), q.get("error", "–")[:60])])
    return ("ONNX Runtime variants (CPU, batch 1): session start and latency with the graph "
            "optimised as it loads or offline; dynamic int8 with its cost on the task metric\n\n"
            + md_table(["model", "start ms (online)", "start ms (offline)", "b1 ms (online)",
                        "b1 ms (offline)", "b1 ms (1 thread)", "b1 ms (int8)", "task metric",
                        "fp32", "int8", "int8 used"], rows))
