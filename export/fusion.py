"""Export trained fusion models into a bundle: one ONNX graph each, checked against PyTorch,
and the ablation on the bundle's split measured through ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

from export.onnx import OPSET, ExportError, export_onnx, io_spec
from mmdemo.bundle import recover_dir
from mmdemo.engine import open_session
from mmdemo.preprocess import PreprocessSpec
from mmdemo.text import TextTokenizer
from training.data.tasks import TaskSet, load_coco_tasks, load_shapes_tasks
from training.data.transforms import load_images
from training.evaluate import task_metrics
from training.fusion import FUSED, METHODS, FusionModel
from training.train_fusion import load_fusion

A_SWEEP = [0.0, 0.5, 1.0]  # weighted_sum is also measured at these image weights
MAX_REL_DIFF = 1e-4  # ORT vs PyTorch, relative to the output's largest magnitude


def graph_inputs(method: str) -> list[str]:
    """The inputs a method's graph takes (what it does not read, it does not ask for)."""
    names = []
    if method != "text_only":
        names.append("image")
    if method != "image_only":
        names += ["input_ids", "attention_mask"]
    if method == "weighted_sum":
        names.append("a")
    return names


def graph_outputs(method: str) -> list[str]:
    return ["logits", "values", "kinds"] + (["attention"] if method == "cross_attention" else [])


class FusionOnnx(nn.Module):
    """Named inputs as graph_inputs(method) -> logits (N, C), values (N, R), kinds (N, K)
    [, attention (N, h, w)]."""

    def __init__(self, model: FusionModel):
        super().__init__()
        self.model = model
        self.names = graph_inputs(model.method)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = dict(zip(self.names, args))
        image = x.get("image")
        ids, mask = x.get("input_ids"), x.get("attention_mask")
        n = (image if image is not None else ids).shape[0]
        a = x.get("a", torch.full((n,), 0.5))
        out = self.model(image, ids, mask, a)
        return tuple(out[k] for k in graph_outputs(self.model.method))


def task_split(meta: dict, spine_train: dict, data: str | None, split: str) -> TaskSet:
    """The fusion run's evaluation items: COCO val as configured, else a shapes-world split."""
    fc = meta["fusion_config"]
    if fc.get("val_captions"):
        return load_coco_tasks(fc["val_captions"], fc["val_instances"], fc["val_images"],
                               fc.get("limit_val"))
    return load_shapes_tasks(data or fc.get("data") or spine_train["data"], split)


def run_ort(sess: ort.InferenceSession, method: str, tasks: TaskSet, images: np.ndarray,
            tok: TextTokenizer, a: float = 0.5, bs: int = 256) -> dict[str, np.ndarray]:
    """Every item of `tasks` through one fusion graph; images: float32 (N_img, 3, S, S)."""
    names, inputs = graph_outputs(method), graph_inputs(method)
    outs: dict[str, list] = {k: [] for k in names}
    for s in range(0, len(tasks), bs):
        rows = np.arange(s, min(s + bs, len(tasks)))
        feed = {}
        if "image" in inputs:
            feed["image"] = images[tasks.item_image[rows]]
        if "input_ids" in inputs:
            feed["input_ids"], feed["attention_mask"] = tok([tasks.texts[r] for r in rows])
        if method == "weighted_sum":
            feed["a"] = np.full(len(rows), a, dtype=np.float32)
        for k, v in zip(names, sess.run(names, feed)):
            outs[k].append(v)
    return {k: np.concatenate(v) for k, v in outs.items()}


def parity(model: FusionModel, sess: ort.InferenceSession, method: str, tasks: TaskSet,
           images: np.ndarray, tok: TextTokenizer) -> dict:
    """ORT against PyTorch on an item of every kind (texts of different lengths) and a few
    more: a batch of 7 or more, never the traced 2."""
    per_kind = [np.flatnonzero(tasks.kinds == k) for k in range(len(tasks.kind_names))]
    rows = [int(r[0]) for r in per_kind if len(r)] + [int(r[1]) for r in per_kind if len(r) > 1]
    rows = np.array((rows + list(range(7)))[:max(7, len(per_kind))])
    sub = TaskSet(tasks.image_dir, tasks.image_ids, tasks.files, tasks.item_image[rows],
                  [tasks.texts[r] for r in rows], tasks.kinds[rows], tasks.labels[rows],
                  tasks.values[rows], tasks.class_names, tasks.value_names, tasks.kind_names)
    got = run_ort(sess, method, sub, images, tok, a=0.3)
    ids, mask = tok(sub.texts)
    with torch.no_grad():
        ref = model(torch.from_numpy(images[sub.item_image]), torch.from_numpy(ids),
                    torch.from_numpy(mask), torch.full((len(rows),), 0.3))
    worst = 0.0
    for k, v in got.items():
        r = ref[k].numpy()
        rel = float(np.abs(r - v).max() / max(1.0, float(np.abs(r).max())))
        if rel > MAX_REL_DIFF:
            raise ExportError(f"{method} output {k}: ONNX Runtime differs from PyTorch by "
                              f"{rel:.2e} (relative; limit {MAX_REL_DIFF:.0e})")
        worst = max(worst, rel)
    return {"max_rel_diff": worst, "batch": len(rows)}


def export_fusion(fusion_dir: Path, tmp: Path, spine_meta: dict, gallery_ids: list[int],
                  gallery_images: np.ndarray, spec: PreprocessSpec, tok: TextTokenizer,
                  data: str | None, split: str) -> dict:
    """Write fusion_<method>.onnx for every trained method under fusion_dir into the bundle
    folder `tmp`; returns {"models": manifest entries, "fusion": the fusion section,
    "metrics": the ablation}. gallery_images: float32 (N, 3, S, S) of gallery_ids, reused when
    the task's images are the gallery's (the shapes world's test split)."""
    for m in METHODS:  # a save killed between its renames leaves the checkpoint aside
        recover_dir(fusion_dir / m / "checkpoints" / "last")
    methods = [m for m in METHODS if (fusion_dir / m / "checkpoints" / "last").is_dir()]
    if not methods:
        raise FileNotFoundError(f"{fusion_dir} holds no trained fusion method")
    models, metrics, task, sweep = {}, {}, None, {}
    tasks = None
    for method in methods:
        model, meta = load_fusion(fusion_dir / method)
        if tasks is None:
            tasks = task_split(meta, spine_meta["train_config"], data, split)
            images = (gallery_images if list(tasks.image_ids) == list(gallery_ids) else
                      load_images(tasks.paths(), spec, "task images").numpy())
        task = meta["task"]
        names = graph_inputs(method)
        sample = {"image": torch.from_numpy(images[:2])}
        ids, mask = tok(tasks.texts[:2])
        sample["input_ids"], sample["attention_mask"] = (torch.from_numpy(ids),
                                                         torch.from_numpy(mask))
        sample["a"] = torch.full((2,), 0.5)
        dynamic = {n: {0: "batch"} for n in names + graph_outputs(method)}
        for n in ("input_ids", "attention_mask"):
            if n in dynamic:
                dynamic[n] = {0: "batch", 1: "length"}
        path = export_onnx(FusionOnnx(model), tuple(sample[n] for n in names), names, dynamic,
                           tmp / f"fusion_{method}.onnx", tuple(graph_outputs(method)))
        sess = open_session(path)
        check = parity(model, sess, method, tasks, images, tok)
        metrics[method] = task_metrics(run_ort(sess, method, tasks, images, tok), tasks)
        metrics[method]["parity_max_rel_diff"] = check["max_rel_diff"]
        if method == "weighted_sum":
            sweep = {str(a): task_metrics(run_ort(sess, method, tasks, images, tok, a), tasks)
                     for a in A_SWEEP}
        models[f"fusion_{method}"] = {"file": path.name, "opset": OPSET, "method": method,
                                      **io_spec(path)}
        head = metrics[method].get("accuracy", metrics[method].get("mAP"))
        print(f"fusion {method}: parity {check['max_rel_diff']:.1e}, {split} score "
              f"{head:.3f}", flush=True)
    score = "mAP" if task["multilabel"] else "accuracy"
    fused = [m for m in methods if m in FUSED]
    best = max(fused or methods, key=lambda m: metrics[m][score])
    return {"models": models, "metrics": {"methods": metrics, "weighted_sum_a": sweep,
                                          "score": score, "best": best},
            "fusion": {"methods": methods, "default": best, "task": task,
                       "examples": examples(tasks, 12)}}


def examples(tasks: TaskSet, n: int) -> list[dict]:
    """Items of every kind, round robin, with their true answers (for the app's examples)."""
    per_kind = [list(np.flatnonzero(tasks.kinds == k)) for k in range(len(tasks.kind_names))]
    out, i = [], 0
    while len(out) < n and any(per_kind):
        rows = per_kind[i % len(per_kind)]
        if rows:
            r = rows.pop(len(rows) // 2)  # from the middle: not always the first images
            item = {"image_id": int(tasks.image_ids[tasks.item_image[r]]), "text": tasks.texts[r],
                    "kind": tasks.kind_names[tasks.kinds[r]]}
            if tasks.multilabel:
                item["answer"] = [c for c, y in zip(tasks.class_names, tasks.labels[r]) if y]
            elif tasks.labels[r] >= 0:
                item["answer"] = tasks.class_names[tasks.labels[r]]
            vals = {v: round(float(x), 4) for v, x in zip(tasks.value_names, tasks.values[r])
                    if np.isfinite(x)}
            if vals:
                item["values"] = vals
            out.append(item)
        i += 1
    return json.loads(json.dumps(out))
