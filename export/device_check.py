"""The GPU check, as one prepared script for a lent GPU machine:

    python -m export.device_check --out DIR            # on a GPU: the seed's configuration
    python -m export.device_check --out DIR --small    # anywhere, in a minute (the tests do)

It writes a synthetic COCO-format set, trains the seed's configuration on it (ResNet-50 and a
BERT-base-size text encoder, frozen, with cached features, through torchrun with DDP on one
process, bf16 autocast on CUDA) for a few hundred steps, exports the bundle, and checks ONNX
Runtime against PyTorch: which provider each session runs on (CUDA where it loads), the largest
difference between their embeddings, and batch-1 and batch-32 latency of both on the same
device. Figures go to DIR/device_check.json and DIR/device_check.md.

The backbones start from random weights written here (the GPU machine reaches no network); the
check is of the pipeline, parity and speed, not of retrieval quality.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(work: Path, captions: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """Random ResNet-50 weights as safetensors, and a random BERT with a vocabulary of the
    captions' words, saved as a transformers folder: what --image-weights and --hf-model read."""
    import torch
    from safetensors.torch import save_file
    from torchvision.models import resnet50
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    resnet = work / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in resnet50(weights=None).state_dict().items()},
              resnet)
    bert = work / "bert"
    bert.mkdir(exist_ok=True)
    words = sorted({w for a in json.loads(captions.read_text())["annotations"]
                    for w in a["caption"].lower().replace(",", " , ").replace(".", " . ")
                    .replace(":", " : ").split()})
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                               *words]) + "\n")
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         intermediate_size=4 * hidden, max_position_embeddings=64)
              ).save_pretrained(bert)
    return resnet, bert


def _latency(fn, runs: int) -> tuple[float, float]:
    """Median and p95 milliseconds of fn() after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times)), float(np.percentile(times, 95))


def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(prog="python -m export.device_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=["cuda", "cpu"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true",
                   help="a minute anywhere: 96 images, 64 px, a 2-layer BERT, 2 epochs")
    args = p.parse_args(argv)
    small = args.small
    n_train, n_val = (96, 24) if small else (2048, 256)
    size, epochs, batch = (64, 2, 16) if small else (224, 10, 64)
    hidden, layers = (128, 2) if small else (768, 12)
    precision = "bf16" if args.device == "cuda" else "fp32"
    out = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"device": args.device, "small": small, "python": platform.python_version(),
                     "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}

    from training.data.synthetic_coco import write_coco_split

    coco = work / "coco"
    if not (coco / "annotations" / "captions_val2017.json").is_file():
        write_coco_split(coco, "train", n_train, seed=0)
        write_coco_split(coco, "val", n_val, seed=1)
    resnet, bert = _weights(work, coco / "annotations" / "captions_train2017.json", hidden,
                            layers)

    # 1. train: torchrun, one process, DDP, frozen backbones with cached features
    run = work / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(_free_port()), "-m", "training",
           "--train-captions", str(coco / "annotations" / "captions_train2017.json"),
           "--train-images", str(coco / "train2017"),
           "--val-captions", str(coco / "annotations" / "captions_val2017.json"),
           "--val-images", str(coco / "val2017"), "--out", str(run),
           "--image-encoder", "resnet50", "--image-weights", str(resnet),
           "--image-size", str(size), "--mean", "0.485", "0.456", "0.406",
           "--std", "0.229", "0.224", "0.225", "--text-encoder", "hf", "--hf-model", str(bert),
           "--image-tune", "frozen", "--text-tune", "frozen", "--device", args.device,
           "--precision", precision, "--epochs", str(epochs), "--batch-size", str(batch),
           "--warmup-steps", "10", "--seed", "0"]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"training failed ({done.returncode}):\n{done.stderr[-4000:]}")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    figures["train"] = {"seconds": round(time.time() - t0, 1), "steps": int(rows[-1]["step"]),
                        "precision": precision, "images": n_train, "image_size": size,
                        "bert": {"hidden": hidden, "layers": layers},
                        "val": {k: float(v) for k, v in rows[-1].items() if "_R@" in k}}

    # 2. export (ONNX graphs checked against PyTorch on the CPU, as always)
    from export.onnx import export_bundle

    t0 = time.time()
    # random backbones embed many captions alike, and on near-ties the order of equal scores
    # differs between hnswlib and exact search: the recall gate is meaningless here, so it is
    # off; the embeddings are compared directly below
    bundle = export_bundle(run, out / "bundle", max_recall_gap=1.0)
    figures["export_seconds"] = round(time.time() - t0, 1)

    # 3. ONNX Runtime (CUDA where it loads) against PyTorch on the same device
    from mmdemo import Engine
    from mmdemo.preprocess import preprocess
    from training.train import load_run

    engine = Engine.load(bundle)
    figures["providers"] = engine.providers
    model, _ = load_run(run)
    model = model.to(args.device).eval()
    images = [p for p in sorted((coco / "val2017").glob("*.jpg"))][:32]
    x = preprocess([str(p) for p in images], engine.spec)
    texts = [a["caption"] for a in json.loads(
        (coco / "annotations" / "captions_val2017.json").read_text())["annotations"]][:32]
    ids, mask = engine.tokenizer(texts)
    with torch.no_grad():
        ref_img = model.encode_image(torch.from_numpy(x).to(args.device)).float().cpu().numpy()
        ref_txt = model.encode_text(torch.from_numpy(ids).to(args.device),
                                    torch.from_numpy(mask).to(args.device)).float().cpu().numpy()
    got_img, got_txt = engine.encode_images([str(p) for p in images]), engine.encode_texts(texts)
    figures["parity"] = {
        "image_max_abs_diff": float(np.abs(ref_img - got_img).max()),
        "text_max_abs_diff": float(np.abs(ref_txt - got_txt).max()),
        "image_min_cosine": float((ref_img * got_img).sum(1).min()),
        "text_min_cosine": float((ref_txt * got_txt).sum(1).min())}
    lat = {}
    runs = 10 if small else 50

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def torch_img(t):
        model.encode_image(t)
        sync()

    @torch.no_grad()
    def torch_txt(t, m):
        model.encode_text(t, m)
        sync()

    for b in (1, 32):
        dev = {k: torch.from_numpy(v[:b]).to(args.device)
               for k, v in (("image", x), ("ids", ids), ("mask", mask))}
        pairs = {
            "image": (lambda d=dev: torch_img(d["image"]),
                      lambda b=b: engine.sessions["image_encoder"].run(None, {"image": x[:b]})),
            "text": (lambda d=dev: torch_txt(d["ids"], d["mask"]),
                     lambda b=b: engine.sessions["text_encoder"].run(
                         None, {"input_ids": ids[:b], "attention_mask": mask[:b]})),
        }
        for name, (a, o) in pairs.items():
            (tp50, tp95), (op50, op95) = _latency(a, runs), _latency(o, runs)
            lat[f"{name}_b{b}"] = {"torch_p50_ms": round(tp50, 2), "torch_p95_ms": round(tp95, 2),
                                   "ort_p50_ms": round(op50, 2), "ort_p95_ms": round(op95, 2),
                                   "speedup": round(tp50 / op50, 2)}
    figures["latency"] = lat
    (out / "device_check.json").write_text(json.dumps(figures, indent=2))
    lines = [f"# Device check ({figures['gpu'] or 'CPU'}, {args.device})", "",
             f"- providers: {figures['providers']}",
             f"- training: {figures['train']['steps']} steps in {figures['train']['seconds']} s "
             f"({precision}), val {figures['train']['val']}",
             f"- parity ONNX Runtime vs PyTorch: {figures['parity']}", "",
             "| model, batch | PyTorch p50 ms | ONNX Runtime p50 ms | speed-up |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['torch_p50_ms']} | {v['ort_p50_ms']} | {v['speedup']}× |"
              for k, v in lat.items()]
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return figures


if __name__ == "__main__":
    main()
