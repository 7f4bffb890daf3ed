"""Export a trained run to a bundle: ONNX graphs checked against PyTorch, gallery, indexes,
manifest. `export_bundle(run_dir, out_dir)` does the work; `python -m export` calls it."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

from mmdemo.bundle import THUMBNAIL, atomic_dir, sha256_file, write_manifest
from mmdemo.engine import CPU, open_session, optimize_for_cpu
from mmdemo.index import VectorIndex
from mmdemo.preprocess import PreprocessSpec
from mmdemo.text import TextTokenizer
from training.data.coco import CaptionSet, load_captions, load_shapes_split
from training.data.transforms import load_images
from training.evaluate import evaluate_all, flatten_captions
from training.models import DualEncoder
from training.train import embed_images, embed_texts, evaluate_model, load_run

OPSET = 17
MAX_ABS_DIFF = 1e-4  # ORT vs PyTorch, per embedding component
MIN_COSINE = 0.9999  # ORT vs PyTorch, per embedding
MAX_RECALL_GAP = 0.005  # bundle (ORT + hnswlib) vs PyTorch exact search: 0.5 points
GENERATION_PROMPTS = 1000  # test captions the generator draws for its scores (200 scenes)
PACKAGES = ["torch", "torchvision", "onnx", "onnxruntime-gpu", "onnxruntime", "tokenizers",
            "transformers", "hnswlib", "numpy", "pillow", "gradio", "pycocotools"]


class ExportError(RuntimeError):
    """An exported graph does not reproduce PyTorch, or the bundle's metrics drift."""


class ImageEncoderOnnx(nn.Module):
    """image float32 (N, 3, S, S) -> embedding float32 (N, D), L2-normalised."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image)


class TextEncoderOnnx(nn.Module):
    """input_ids int64 (N, L), attention_mask int64 (N, L) -> embedding float32 (N, D)."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


def export_onnx(module: nn.Module, args: tuple, names: list[str], dynamic: dict, path: Path,
                outputs: tuple[str, ...] = ("embedding",)) -> Path:
    """One graph, weights inside, dynamic axes as given; checked with onnx.checker (full)."""
    torch.onnx.export(module.eval(), args, str(path), input_names=names,
                      output_names=list(outputs), dynamic_axes=dynamic, opset_version=OPSET,
                      dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def io_spec(path: Path) -> dict:
    """Inputs and outputs of a graph: name, dtype, shape with dynamic axes named."""
    g = onnx.load(str(path)).graph

    def one(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    return {"inputs": [one(v) for v in g.input], "outputs": [one(v) for v in g.output]}


def compare(name: str, ref: np.ndarray, got: np.ndarray) -> dict:
    """Max abs diff and min cosine of ORT against PyTorch; raises ExportError past the limits."""
    diff = float(np.abs(ref - got).max())
    cos = float(((ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
                                       + 1e-12)).min())
    if diff > MAX_ABS_DIFF or cos < MIN_COSINE:
        raise ExportError(f"{name}: ONNX Runtime differs from PyTorch: max abs diff {diff:.2e} "
                          f"(limit {MAX_ABS_DIFF:.0e}), min cosine {cos:.6f} (limit {MIN_COSINE})")
    return {"max_abs_diff": diff, "min_cosine": cos, "batch": len(ref)}


def build_index(emb: np.ndarray, ids: np.ndarray, encoder: Path, path: Path) -> VectorIndex:
    """An hnswlib index over float32 (N, D) unit vectors under int64 ids (N,), saved at `path`
    with a sidecar naming the encoder graph's sha256."""
    index = VectorIndex(emb.shape[1], len(emb), sha256_file(encoder))
    index.add(emb, ids)
    index.save(path)
    return index


def random_inputs(io: dict, batch: int = 3, length: int = 7, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Inputs for a graph from its io_spec: named dynamic axes at `batch` (the first) and
    `length` (the others), masks all ones, other integers in [0, 2) (valid token ids and
    flags), floats standard normal."""
    rng = np.random.default_rng(seed)
    out = {}
    for v in io["inputs"]:
        shape = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else length)
                 for i, d in enumerate(v["shape"])]
        dtype = np.dtype(v["dtype"])
        if "mask" in v["name"]:
            out[v["name"]] = np.ones(shape, dtype)
        elif dtype.kind in "iub":
            out[v["name"]] = rng.integers(0, 2, shape).astype(dtype)
        else:
            out[v["name"]] = rng.standard_normal(shape).astype(dtype)
    return out


def add_cpu_optimized(folder: Path, models: dict) -> None:
    """Save every graph of `models` (manifest entries) optimised for the CPU at ONNX Runtime's
    level ALL as <name>.cpu.onnx beside it, after checking both give the same outputs on
    random inputs; the entry gets a `cpu_optimized` key (mmdemo.engine.Engine.load)."""
    for role, info in tqdm(models.items(), desc="optimising graphs for the CPU", unit="graph",
                           leave=False):
        src = folder / info["file"]
        dst = src.with_name(src.stem + ".cpu.onnx")
        entry = optimize_for_cpu(src, dst)
        feeds = random_inputs(info)
        ref = open_session(src, [CPU]).run(None, feeds)
        got = open_session(src, [CPU], cpu_optimized=dst).run(None, feeds)
        for name, a, b in zip([o["name"] for o in info["outputs"]], ref, got):
            diff = float(np.abs(a - b).max()) / max(1.0, float(np.abs(a).max()))
            if diff > MAX_ABS_DIFF:
                raise ExportError(f"{role}: the CPU-optimised graph's {name} differs from the "
                                  f"original's by {diff:.2e} (limit {MAX_ABS_DIFF:.0e})")
        info["cpu_optimized"] = entry


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def load_gallery_split(meta: dict, data: str | None, split: str) -> CaptionSet:
    """The captions the gallery is made of: a shapes-world split, or COCO val as configured."""
    tc = meta["train_config"]
    if data is None and tc.get("val_captions"):
        return load_captions(tc["val_captions"], tc["val_images"], limit=tc.get("limit_val"))
    return load_shapes_split(data or tc["data"], split)


def write_gallery(data: CaptionSet, out: Path) -> dict:
    """gallery/<id>.png thumbnails and gallery.json; returns the manifest entry."""
    (out / "gallery").mkdir()
    items = []
    for image_id, path, caps in tqdm(zip(data.image_ids, data.paths(), data.captions),
                                     total=len(data), desc="gallery", unit="img", leave=False):
        rel = f"gallery/{image_id}.png"
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMBNAIL, THUMBNAIL))  # shrinks only
            im.save(out / rel)
        items.append({"id": image_id, "file": rel, "caption_ids": [c[0] for c in caps],
                      "captions": [c[1] for c in caps]})
    (out / "gallery.json").write_text(json.dumps({"items": items}))
    return {"file": "gallery.json", "count": len(items),
            "captions": sum(len(c) for c in data.captions)}


def export_bundle(run_dir: Path | str, out_dir: Path | str, data: str | None = None,
                  split: str = "test", fusion_dir: Path | str | None = None,
                  max_recall_gap: float = MAX_RECALL_GAP,
                  captioner_dir: Path | str | None = None,
                  generator_dir: Path | str | None = None,
                  generation_prompts: int | None = GENERATION_PROMPTS) -> Path:
    """Write the bundle of a trained run to out_dir (atomically); returns out_dir.

    The gallery is `split` of the shapes-world folder `data` (default: the run's own data), or
    the run's COCO validation captions when it was trained on COCO. `fusion_dir` (written by
    `python -m training.train_fusion`) adds its fusion models and their ablation;
    `captioner_dir` (`python -m training.train_captioner`) the caption decoder and
    `generator_dir` (`python -m training.train_generator`) the text-to-image generator, each
    with its scores on the gallery split (the generator on its first `generation_prompts`
    captions; None: all). Export fails
    when a Recall@K through the bundle is more than `max_recall_gap` from PyTorch's.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, meta = load_run(run_dir)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    tok_cfg = meta["tokenizer"]
    tok = TextTokenizer.from_file(run_dir / "tokenizer.json", tok_cfg["max_length"],
                                  tok_cfg["pad_token"])
    gal = load_gallery_split(meta, data, split)
    images = load_images(gal.paths(), spec, "gallery images")
    texts, rows, _ = flatten_captions(gal)
    cap_ids = np.array([c[0] for caps in gal.captions for c in caps], dtype=np.int64)
    img_ids = np.array(gal.image_ids, dtype=np.int64)

    with atomic_dir(out_dir) as tmp:
        # 1. graphs, traced at batch 2, checked at other batch sizes and lengths
        print("exporting ONNX graphs ...", flush=True)
        ids2, mask2 = tok(texts[:2])
        export_onnx(ImageEncoderOnnx(model), (images[:2],), ["image"],
                    {"image": {0: "batch"}, "embedding": {0: "batch"}}, tmp / "image_encoder.onnx")
        export_onnx(TextEncoderOnnx(model), (torch.from_numpy(ids2), torch.from_numpy(mask2)),
                    ["input_ids", "attention_mask"],
                    {"input_ids": {0: "batch", 1: "length"},
                     "attention_mask": {0: "batch", 1: "length"}, "embedding": {0: "batch"}},
                    tmp / "text_encoder.onnx")
        sess_i = open_session(tmp / "image_encoder.onnx")
        sess_t = open_session(tmp / "text_encoder.onnx")

        def ort_images(x: torch.Tensor, bs: int = 256) -> np.ndarray:
            return np.concatenate([sess_i.run(None, {"image": x[i: i + bs].numpy()})[0]
                                   for i in range(0, len(x), bs)])

        def ort_texts(t: list[str], bs: int = 256) -> np.ndarray:
            out = []
            for i in range(0, len(t), bs):
                ids, mask = tok(t[i: i + bs])
                out.append(sess_t.run(None, {"input_ids": ids, "attention_mask": mask})[0])
            return np.concatenate(out)

        # 2. parity on batch sizes and lengths other than the traced ones: the shortest texts
        # alone, the longest alone, and both mixed (padding)
        n_tokens = {t: int(m.sum()) for t, m in zip(texts, tok(texts)[1])}
        by_len = sorted(n_tokens, key=n_tokens.get)  # distinct texts, first-seen order on ties
        text_batches = [by_len[:3], by_len[-4:], by_len[:3] + by_len[-4:]]
        parity = {
            "image_encoder": compare("image_encoder", embed_images(model, images[:5]),
                                     ort_images(images[:5])),
        }
        worst = None
        for batch in text_batches:
            got = compare(f"text_encoder ({len(batch)} texts, lengths "
                          f"{sorted({n_tokens[t] for t in batch})})",
                          embed_texts(model, tok, batch), ort_texts(batch))
            if worst is None or got["max_abs_diff"] > worst["max_abs_diff"]:
                worst = got
        parity["text_encoder"] = worst
        print(f"parity ok: {parity}", flush=True)

        # 3. embeddings through ONNX Runtime, indexes with explicit ids
        img_emb, txt_emb = ort_images(images), ort_texts(texts)
        index_i = build_index(img_emb, img_ids, tmp / "image_encoder.onnx",
                              tmp / "index_images.bin")
        index_c = build_index(txt_emb, cap_ids, tmp / "text_encoder.onnx",
                              tmp / "index_captions.bin")

        # 4. metrics: PyTorch exact search vs the bundle (ORT embeddings + hnswlib)
        print("evaluating PyTorch and the bundle ...", flush=True)
        row_of_img = {int(i): r for r, i in enumerate(img_ids)}
        row_of_cap = {int(i): r for r, i in enumerate(cap_ids)}

        def t2i(q, k):
            return np.vectorize(row_of_img.get)(index_i.search(q, k)[0])

        def i2t(q, k):
            return np.vectorize(row_of_cap.get)(index_c.search(q, k)[0])

        m_torch = evaluate_model(model, images, tok, gal)
        m_bundle = evaluate_all(gal, lambda r: img_emb[r], ort_texts, t2i=t2i, i2t=i2t)
        gaps = {k: abs(m_bundle[k] - m_torch[k]) for k in m_torch if "R@" in k}
        worst = max(gaps, key=gaps.get)
        if gaps[worst] > max_recall_gap:
            raise ExportError(f"bundle {worst} = {m_bundle[worst]:.4f} but PyTorch gives "
                              f"{m_torch[worst]:.4f}: more than {max_recall_gap * 100} points")

        # 5. fusion models, each checked against PyTorch, and the ablation through ORT
        fusion = None
        if fusion_dir is not None:
            from export.fusion import export_fusion

            print("exporting fusion models ...", flush=True)
            fusion = export_fusion(Path(fusion_dir), tmp, meta, gal.image_ids, images.numpy(),
                                   spec, tok, data, split)

        # 6. generation: the caption decoder and the image generator, each checked against
        # PyTorch and scored through ONNX Runtime (the shapes world: graded by the oracle)
        raw = None
        if (captioner_dir or generator_dir) and gal.objects:
            raw = []
            for p in gal.paths():
                with Image.open(p) as im:
                    raw.append(np.asarray(im.convert("RGB")))
        captioning = generation = None
        if captioner_dir is not None:
            from export.captioner import export_captioner

            print("exporting the caption decoder ...", flush=True)
            captioning = export_captioner(Path(captioner_dir), tmp, model, images.numpy(), gal,
                                          tok, raw)
        if generator_dir is not None:
            from export.generator import export_generator

            print("exporting the image generator ...", flush=True)
            generation = export_generator(
                Path(generator_dir), tmp, gal, spec,
                lambda x: sess_i.run(None, {"image": x})[0], ort_texts, run_dir=run_dir,
                limit=generation_prompts)

        # 7. the rest of the bundle
        shutil.copy(run_dir / "tokenizer.json", tmp / "tokenizer.json")
        for name in ("curves.png", "metrics.csv"):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, tmp / name)
        gallery = write_gallery(gal, tmp)
        manifest = {
            "name": Path(out_dir).name,
            "packages": package_versions(),
            "model_config": meta["model_config"],
            "train_config": meta["train_config"],
            "trained_epochs": meta["epoch"],
            "preprocess": spec.to_dict(),
            "tokenizer": {"file": "tokenizer.json", **tok.settings()},
            "models": {
                "image_encoder": {"file": "image_encoder.onnx", "opset": OPSET,
                                  **io_spec(tmp / "image_encoder.onnx")},
                "text_encoder": {"file": "text_encoder.onnx", "opset": OPSET,
                                 **io_spec(tmp / "text_encoder.onnx")},
            },
            "indexes": {
                "images": {"file": "index_images.bin", "encoder": "image_encoder",
                           "count": len(index_i), "ids": "gallery image ids"},
                "captions": {"file": "index_captions.bin", "encoder": "text_encoder",
                             "count": len(index_c), "ids": "gallery caption ids"},
            },
            "gallery": {**gallery, "split": split},
            "curves": "curves.png" if (tmp / "curves.png").is_file() else None,
            "metrics": {"split": split, "bundle": m_bundle, "torch": m_torch,
                        "parity": parity, "val_last_epoch": meta.get("metrics", {})},
        }
        if fusion is not None:
            manifest["models"].update(fusion["models"])
            manifest["fusion"] = fusion["fusion"]
            manifest["metrics"]["fusion"] = fusion["metrics"]
        if captioning is not None:
            manifest["models"].update(captioning["models"])
            manifest["captioning"] = captioning["captioning"]
            manifest["metrics"]["captioning"] = captioning["metrics"]
        if generation is not None:
            manifest["models"].update(generation["models"])
            # ("generation" in a manifest counts the changes to its gallery: mmdemo.store)
            manifest["generator"] = generation["generation"]
            manifest["metrics"]["generator"] = generation["metrics"]
        add_cpu_optimized(tmp, manifest["models"])
        write_manifest(tmp, manifest)
    print(f"bundle written to {out_dir}", flush=True)
    return out_dir
