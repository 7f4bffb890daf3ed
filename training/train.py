"""Train the dual encoder: a plain loop with checkpoints, resume, metrics CSV and curves.

    python -m training --data data/shapes --out runs/shapes --epochs 12
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmdemo.bundle import atomic_dir, recover_dir
from mmdemo.preprocess import PreprocessSpec
from mmdemo.text import TextTokenizer
from training.data.coco import CaptionSet, load_captions, load_shapes_split
from training.data.shapes import perturb
from training.data.transforms import load_images
from training.evaluate import evaluate_all
from training.losses import LOSSES
from training.models import DualEncoder, ModelConfig, build_model
from training.tokenizer import hf_tokenizer_json, train_tokenizer


@dataclass
class TrainConfig:
    data: str = "data/shapes"  # shapes-world folder; ignored where the *_captions paths are set
    train_captions: str | None = None  # COCO-format captions JSON (e.g. captions_train2017.json)
    train_images: str | None = None  # image folder for train_captions
    val_captions: str | None = None  # COCO-format captions JSON for validation
    val_images: str | None = None  # image folder for val_captions
    limit_train: int | None = None  # keep only the first N training images
    limit_val: int | None = None  # keep only the first N validation images
    out: str = "runs/shapes"  # run folder: checkpoints, tokenizer, metrics, curves
    epochs: int = 12  # passes over the training images
    batch_size: int = 128  # images per step (one caption each)
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr / 20
    grad_clip: float = 1.0  # max global gradient norm
    loss: str = "infonce"  # infonce | triplet | contrastive
    margin: float = 0.2  # triplet / contrastive margin (unused by infonce)
    hard_negatives: int = 2  # edited, false captions per image (shapes world only; 0 = none)
    hard_weight: float = 1.0  # weight of the term ranking an image's true caption above its
    # own edited captions
    t2t_weight: float = 1.0  # weight of the caption-to-caption term (two captions per image);
    # 0 turns it off
    seed: int = 0  # model init, sampling order, negatives
    threads: int = 0  # torch threads; 0 leaves torch's default
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # image normalisation
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])  # image normalisation
    resume: bool = True  # continue from out/checkpoints/last when present


# ----------------------------------------------------------------------------- data


def load_splits(cfg: TrainConfig) -> tuple[CaptionSet, CaptionSet]:
    if cfg.train_captions:
        if not (cfg.train_images and cfg.val_captions and cfg.val_images):
            raise ValueError("train_captions needs train_images, val_captions and val_images")
        return (load_captions(cfg.train_captions, cfg.train_images, limit=cfg.limit_train),
                load_captions(cfg.val_captions, cfg.val_images, limit=cfg.limit_val))
    root = Path(cfg.data)
    if not (root / "captions_train.json").is_file():
        raise FileNotFoundError(f"{root} has no captions_train.json; generate the shapes world "
                                f"with `python -m training.data.shapes --out {root}`")
    return (load_shapes_split(root, "train", cfg.limit_train),
            load_shapes_split(root, "val", cfg.limit_val))


def epoch_batches(data: CaptionSet, cfg: TrainConfig, epoch: int):
    """Yield (image rows, captions, other captions of the same images, hard-negative captions,
    the batch row each negative belongs to) for one epoch, seeded by epoch."""
    rng = random.Random(f"{cfg.seed}-{epoch}")
    order = list(range(len(data)))
    rng.shuffle(order)
    for s in range(0, len(order) - cfg.batch_size + 1 if len(order) >= cfg.batch_size else 1,
                   cfg.batch_size):
        rows = order[s: s + cfg.batch_size]
        texts, others, negs, neg_rows = [], [], [], []
        for b, r in enumerate(rows):
            caps = data.captions[r]
            i = rng.randrange(len(caps))
            _, text, claim = caps[i]
            texts.append(text)
            if cfg.t2t_weight > 0:  # another caption of the same image (itself if it is alone)
                j = (i + rng.randrange(1, len(caps))) % len(caps) if len(caps) > 1 else i
                others.append(caps[j][1])
            if claim is None or not data.objects:
                continue
            for _ in range(cfg.hard_negatives):
                neg = perturb(data.objects[r], claim, rng)
                if neg is not None:
                    negs.append(neg["text"])
                    neg_rows.append(b)
        yield rows, texts, others, negs, neg_rows


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(ckpt_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    meta: dict) -> None:
    """model.safetensors + optimizer.safetensors + rng.safetensors + meta.json, written into a
    temporary directory that replaces ckpt_dir whole: killed at any moment, the next
    `recover_dir(ckpt_dir)` leaves the previous checkpoint or this one, never a mix."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    otensors = {f"{pid}.{name}": t.contiguous() for pid, st in osd["state"].items()
                for name, t in st.items() if torch.is_tensor(t)}
    meta = {**meta, "param_groups": osd["param_groups"]}
    with atomic_dir(ckpt_dir) as tmp:
        save_file(tensors, tmp / "model.safetensors")
        save_file(otensors, tmp / "optimizer.safetensors")
        # torch's generator, so a resumed run draws what an uninterrupted one would
        save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(ckpt_dir: Path, model: torch.nn.Module,
                    opt: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (and optimizer state and torch's RNG state, with opt) from a checkpoint
    directory, after repairing a save that was killed halfway; returns its meta."""
    recover_dir(ckpt_dir)
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    model.load_state_dict(load_file(ckpt_dir / "model.safetensors"))
    if opt is not None:
        flat = load_file(ckpt_dir / "optimizer.safetensors")
        state: dict[int, dict] = {}
        for key, t in flat.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = t
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if (ckpt_dir / "rng.safetensors").is_file():  # absent in checkpoints from before it
            torch.set_rng_state(load_file(ckpt_dir / "rng.safetensors")["torch"])
    return meta


def trim_metrics(csv_path: Path, epochs: int) -> None:
    """Drop rows past `epochs` from a metrics CSV: a run killed after writing an epoch's row but
    before its checkpoint redoes that epoch, and must not log it twice."""
    if not csv_path.is_file():
        return
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    keep = [r for r in rows if int(r["epoch"]) <= epochs]
    if len(keep) < len(rows) and fields:
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(keep)
        tmp.replace(csv_path)


def load_run(run_dir: Path | str) -> tuple[DualEncoder, dict]:
    """The trained model of a run (eval mode) and its checkpoint metadata."""
    ckpt = Path(run_dir) / "checkpoints" / "last"
    recover_dir(ckpt)
    if not (ckpt / "meta.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint; train it with `python -m training`")
    meta = json.loads((ckpt / "meta.json").read_text())
    model = build_model(ModelConfig(**meta["model_config"]))
    load_checkpoint(ckpt, model)
    return model.eval(), meta


# ----------------------------------------------------------------------------- curves


def plot_curves(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ep, [float(r["train_loss"]) for r in rows], marker="o")
    a.set(title="training loss", xlabel="epoch")
    for key in ("t2i_R@1", "t2i_R@10", "i2t_R@1", "i2t_R@10"):
        b.plot(ep, [float(r[key]) for r in rows], marker="o", label=key)
    b.set(title="validation recall", xlabel="epoch", ylim=(0, 1.02))
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- loop


@torch.no_grad()
def embed_images(model: DualEncoder, images: torch.Tensor, bs: int = 256) -> np.ndarray:
    """float32 (N, D) from preprocessed images (N, 3, S, S)."""
    model.eval()
    return torch.cat([model.encode_image(images[i: i + bs])
                      for i in range(0, len(images), bs)]).numpy()


@torch.no_grad()
def embed_texts(model: DualEncoder, tok: TextTokenizer, texts: list[str], bs: int = 256
                ) -> np.ndarray:
    """float32 (N, D) from texts."""
    model.eval()
    out = []
    for i in range(0, len(texts), bs):
        ids, mask = tok(texts[i: i + bs])
        out.append(model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)))
    return torch.cat(out).numpy()


def evaluate_model(model: DualEncoder, images: torch.Tensor, tok: TextTokenizer,
                   data: CaptionSet, semantic: bool = True) -> dict[str, float]:
    """Every retrieval measure of a torch model on one split (images preprocessed, in order)."""
    return evaluate_all(data, lambda rows: embed_images(model, images[rows]),
                        lambda texts: embed_texts(model, tok, texts), semantic=semantic)


def train(cfg: TrainConfig, model_cfg: ModelConfig) -> Path:
    """Train to cfg.epochs, resuming from the last checkpoint of cfg.out; returns the run dir."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss {cfg.loss!r}; expected one of {sorted(LOSSES)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoints" / "last"
    train_set, val_set = load_splits(cfg)

    tok_path = out / "tokenizer.json"
    pad_token = "[PAD]"
    if model_cfg.text_encoder == "hf":
        pad_token = hf_tokenizer_json(model_cfg.hf_model, tok_path)
    elif not tok_path.is_file():
        train_tokenizer([t for caps in train_set.captions for _, t, _ in caps], tok_path)
    tok = TextTokenizer.from_file(tok_path, model_cfg.max_length, pad_token)
    model_cfg.vocab_size = tok.tokenizer.get_vocab_size()
    spec = PreprocessSpec(model_cfg.image_size, list(cfg.mean), list(cfg.std))

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    loss_fn = LOSSES[cfg.loss](cfg.margin, cfg.hard_weight, cfg.t2t_weight)

    start_epoch, step = 0, 0
    recover_dir(ckpt)
    if cfg.resume and (ckpt / "meta.json").is_file():
        meta = load_checkpoint(ckpt, model, opt)
        if meta["model_config"] != asdict(model_cfg):
            raise ValueError(f"{ckpt} was trained with another model config; use a new --out "
                             "or --no-resume")
        start_epoch, step = meta["epoch"], meta["step"]
        print(f"resuming {out} from epoch {start_epoch} (step {step})")
    if start_epoch >= cfg.epochs:
        print(f"{out} already trained for {start_epoch} epochs")
        return out

    train_images = load_images(train_set.paths(), spec, "train images")
    val_images = load_images(val_set.paths(), spec, "val images")
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    csv_path = out / "metrics.csv"
    trim_metrics(csv_path, start_epoch)
    (out / "config.json").write_text(json.dumps({"train_config": asdict(cfg),
                                                 "model_config": asdict(model_cfg)}, indent=2))

    def lr_at(s: int) -> float:
        if s < cfg.warmup_steps:
            return cfg.lr * (s + 1) / cfg.warmup_steps
        p = (s - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.lr / 20 + (cfg.lr - cfg.lr / 20) * 0.5 * (1 + math.cos(math.pi * min(1, p)))

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, losses = time.time(), []
        bar = tqdm(epoch_batches(train_set, cfg, epoch), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for rows, texts, others, negs, neg_rows in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            b, n2 = len(rows), len(others)
            ids, mask = tok(texts + others + negs)
            img = model.encode_image(train_images[rows])
            txt = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
            neg = (txt[b + n2:], torch.tensor(neg_rows)) if negs else None
            terms = loss_fn(img, txt[:b], neg, model.logit_scale,
                            txt2=txt[b: b + n2] if others else None)
            loss = sum(terms.values())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        metrics = evaluate_model(model, val_images, tok, val_set, semantic=False)
        row = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
               "lr": lr_at(step), "temperature": float(1 / model.logit_scale.detach().exp()),
               "seconds": round(time.time() - t0, 1), **metrics}
        new = not csv_path.is_file() or epoch == 0
        with csv_path.open("w" if new else "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        plot_curves(csv_path, out / "curves.png")
        save_checkpoint(ckpt, model, opt, {"epoch": epoch + 1, "step": step,
                                           "model_config": asdict(model_cfg),
                                           "train_config": asdict(cfg),
                                           "preprocess": spec.to_dict(),
                                           "tokenizer": tok.settings(), "metrics": metrics})
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.3f}  "
              f"val t2i R@1/10 {metrics['t2i_R@1']:.3f}/{metrics['t2i_R@10']:.3f}  "
              f"i2t R@1/10 {metrics['i2t_R@1']:.3f}/{metrics['i2t_R@10']:.3f}  "
              f"({row['seconds']}s)", flush=True)
    return out
