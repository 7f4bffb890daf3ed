"""Train the dual encoder: a plain loop with checkpoints, resume, metrics CSV and curves.

    python -m training --data data/shapes --out runs/shapes --epochs 12
    torchrun --nproc-per-node 2 -m training --threads 1 ...   # data parallel (distributed.py)
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from bisect import bisect_left
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmdemo.bundle import atomic_dir, recover_dir
from mmdemo.preprocess import PreprocessSpec
from mmdemo.text import TextTokenizer
from training import distributed
from training.data.coco import CaptionSet, load_captions, load_shapes_split
from training.data.shapes import perturb
from training.data.transforms import load_images
from training.evaluate import evaluate_all
from training.features import TextFeatures, image_features
from training.losses import LOSSES
from training.models import (
    DualEncoder,
    ModelConfig,
    build_model,
    eval_frozen_stages,
    frozen,
    set_trainable,
)
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
    device: str = "cpu"  # cpu | cuda (under torchrun: cuda:LOCAL_RANK, NCCL; cpu: Gloo)
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast of the encoders (fp16: cuda only)
    grad_accum: int = 1  # micro-steps per global batch (the loss still spans the whole batch)
    image_tune: str = "all"  # image backbone: all (fine-tune) | frozen | N (its last N stages)
    text_tune: str = "all"  # text backbone: all | frozen | N
    # A frozen backbone's features are computed once and cached (safetensors), in
    # feature_cache or else out/features; runs with the same backbone may share one folder.
    feature_cache: str | None = None


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    otensors = {f"{pid}.{name}": t.cpu().contiguous() for pid, st in osd["state"].items()
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


def warmup_cosine(step: int, peak: float, warmup: int, total: int) -> float:
    """The learning rate at `step`: linear warm-up to `peak` over `warmup` steps, then cosine
    decay to peak / 20 at `total` steps (every trainer here uses it)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak / 20 + (peak - peak / 20) * 0.5 * (1 + math.cos(math.pi * p))


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


def append_metrics(csv_path: Path, row: dict, first: bool) -> None:
    """One epoch's row of metrics.csv; `first` (or a missing file) starts it with the header."""
    new = first or not csv_path.is_file()
    with csv_path.open("w" if new else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def last_checkpoint(out_dir: Path | str, command: str) -> tuple[Path, dict]:
    """out_dir/checkpoints/last (a save killed halfway repaired) and its meta; without one, a
    FileNotFoundError that names the `command` that trains it."""
    ckpt = Path(out_dir) / "checkpoints" / "last"
    recover_dir(ckpt)
    if not (ckpt / "meta.json").is_file():
        raise FileNotFoundError(f"{out_dir} has no checkpoint; train it with `{command}`")
    return ckpt, json.loads((ckpt / "meta.json").read_text())


def load_run(run_dir: Path | str) -> tuple[DualEncoder, dict]:
    """The trained model of a run (eval mode) and its checkpoint metadata."""
    ckpt, meta = last_checkpoint(run_dir, "python -m training")
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
    """float32 (N, D) from preprocessed images (N, 3, S, S), on the model's device."""
    model.eval()
    device = model.logit_scale.device
    return torch.cat([model.encode_image(images[i: i + bs].to(device)).float().cpu()
                      for i in range(0, len(images), bs)]).numpy()


@torch.no_grad()
def embed_texts(model: DualEncoder, tok: TextTokenizer, texts: list[str], bs: int = 256
                ) -> np.ndarray:
    """float32 (N, D) from texts, on the model's device."""
    model.eval()
    device = model.logit_scale.device
    out = []
    for i in range(0, len(texts), bs):
        ids, mask = tok(texts[i: i + bs])
        out.append(model.encode_text(torch.from_numpy(ids).to(device),
                                     torch.from_numpy(mask).to(device)).float().cpu())
    return torch.cat(out).numpy()


def evaluate_model(model: DualEncoder, images: torch.Tensor, tok: TextTokenizer,
                   data: CaptionSet, semantic: bool = True) -> dict[str, float]:
    """Every retrieval measure of a torch model on one split (images preprocessed, in order)."""
    return evaluate_all(data, lambda rows: embed_images(model, images[rows]),
                        lambda texts: embed_texts(model, tok, texts), semantic=semantic)


class EncodeBoth(nn.Module):
    """The training forward, the one call DDP wraps: (image rows of the training set, texts) ->
    (img (B, D), txt (T, D), logit_scale ()), through the loop's encode functions."""

    def __init__(self, model: DualEncoder, encode_images, encode_texts):
        super().__init__()
        self.model, self.encode_images, self.encode_texts = model, encode_images, encode_texts

    def forward(self, rows: list[int], texts: list[str]):
        # logit_scale as an output (a copy), so that DDP counts it as used by this forward
        return self.encode_images(rows), self.encode_texts(texts), self.model.logit_scale.clone()


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def shard(n: int, parts: int, i: int) -> slice:
    """The i-th of `parts` contiguous, near-equal pieces of range(n)."""
    return slice(n * i // parts, n * (i + 1) // parts)


def backward_global_batch(net: nn.Module, loss_fn: nn.Module, batch: tuple, grad_accum: int = 1,
                          amp=nullcontext, scaler: torch.amp.GradScaler | None = None) -> float:
    """Accumulate into the parameters the gradient of the loss over one global batch (as
    `epoch_batches` yields it, the same on every rank); returns that loss. `net` is an
    EncodeBoth, wrapped in DDP under torchrun.

    The batch is cut into `grad_accum` micro-batches, each cut into one contiguous share per
    rank; this process encodes its shares. The loss is computed once, over the embeddings of the
    whole global batch (gathered across ranks and micro-batches), so the negatives span the
    global batch; its gradient with respect to the embeddings is then pushed back through each
    micro-batch's encoders in turn (gradient caching, Gao et al. 2021). With grad_accum 1 the
    forward's graph is kept; above 1 the embeddings are first computed without one and each
    micro-batch is encoded again with one, so memory holds one micro-batch's activations.
    Batch norm sees one micro-batch at a time (across all ranks, see distributed.py).
    """
    rows, texts, others, negs, neg_rows = batch
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    module = net.module if ddp else net
    world, rank = distributed.world_size(), distributed.rank()
    pieces = []  # this rank's (image rows, captions, other captions, negatives) per micro-step
    for j in range(grad_accum):
        m = shard(len(rows), grad_accum, j)
        r = shard(m.stop - m.start, world, rank)
        s = slice(m.start + r.start, m.start + r.stop)
        a, b = bisect_left(neg_rows, s.start), bisect_left(neg_rows, s.stop)
        pieces.append((rows[s], texts[s], others[s] if others else [], negs[a:b]))

    def encode(piece, fwd):
        with amp():
            img, txt, scale = fwd(piece[0], piece[1] + piece[2] + piece[3])
        return _at_least_fp32(img), _at_least_fp32(txt), scale  # the loss runs in fp32 or more

    if grad_accum == 1:
        outs = [encode(pieces[0], net)]
    else:  # no graph; batch-norm statistics are left to the second pass
        saved = [b.clone() for b in module.buffers()]
        with torch.no_grad():
            outs = [encode(p, module) for p in pieces]
        for b, v in zip(module.buffers(), saved):
            b.copy_(v)

    # the loss on detached copies of the embeddings: (img, txt) per micro-step, and the scale
    leaves = [[t.detach().requires_grad_() for t in o[:2]] for o in outs]
    scale = outs[-1][2].detach().requires_grad_()
    parts: list[list[torch.Tensor]] = [[], [], [], []]  # images, captions, others, negatives
    for (img, txt), p in zip(leaves, pieces):
        nt, no = len(p[1]), len(p[2])
        for k, t in enumerate((img, txt[:nt], txt[nt: nt + no], txt[nt + no:])):
            parts[k].append(distributed.gather_with_grad(t))
    # the global batch in its order: micro-batch by micro-batch, rank by rank within each
    img, txt, txt2, neg = (ps[0] if len(ps) == 1 else torch.cat(ps) for ps in parts)
    terms = loss_fn(img, txt, (neg, torch.tensor(neg_rows, device=scale.device)) if negs else None,
                    scale, txt2=txt2 if others else None)
    loss = sum(terms.values())
    flat = [t for lv in leaves for t in lv]
    *grads, g_scale = torch.autograd.grad(scaler.scale(loss) if scaler else loss,
                                          [*flat, scale], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(flat, grads)]

    for j, piece in enumerate(pieces):
        last = j == grad_accum - 1
        with net.no_sync() if ddp and not last else nullcontext():
            img_j, txt_j, scale_j = outs[0] if grad_accum == 1 else encode(piece, net)
            roots, cotangents = [img_j, txt_j], grads[2 * j: 2 * j + 2]
            if last and (g_scale is not None or ddp):  # DDP waits for every parameter
                roots.append(scale_j)
                cotangents.append(torch.zeros_like(scale_j) if g_scale is None else g_scale)
            torch.autograd.backward(roots, cotangents)
    return loss.item()


def train(cfg: TrainConfig, model_cfg: ModelConfig) -> Path:
    """Train to cfg.epochs, resuming from the last checkpoint of cfg.out; returns the run dir.
    Under torchrun every process runs this; rank 0 evaluates and writes the run folder."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss {cfg.loss!r}; expected one of {sorted(LOSSES)}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision {cfg.precision!r}; expected one of {list(PRECISIONS)}")
    if cfg.precision == "fp16" and cfg.device != "cuda":
        raise ValueError(f"precision 'fp16' needs --device cuda (fp16 autocast with a "
                         f"GradScaler); on device {cfg.device!r} use bf16 or fp32")
    if cfg.grad_accum < 1:
        raise ValueError(f"grad_accum {cfg.grad_accum}; expected 1 or more")
    device = distributed.setup(cfg.device)
    try:
        return _train(cfg, model_cfg, device)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> Path:
    main = distributed.is_main()  # rank 0, or the only process: evaluates, prints, writes
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoints" / "last"
    train_set, val_set = load_splits(cfg)
    world, per_step = distributed.world_size(), min(cfg.batch_size, len(train_set))
    if per_step < world * cfg.grad_accum:
        raise ValueError(f"a batch of {per_step} images cannot feed {world} processes x "
                         f"grad_accum {cfg.grad_accum}: every micro-step needs an image")

    tok_path = out / "tokenizer.json"
    pad_token = "[PAD]"
    if main:  # rank 0 writes the tokenizer, the other ranks read it
        if model_cfg.text_encoder == "hf":
            pad_token = hf_tokenizer_json(model_cfg.hf_model, tok_path)
        elif not tok_path.is_file():
            train_tokenizer([t for caps in train_set.captions for _, t, _ in caps], tok_path)
    pad_token = distributed.broadcast_object(pad_token)
    tok = TextTokenizer.from_file(tok_path, model_cfg.max_length, pad_token)
    model_cfg.vocab_size = tok.tokenizer.get_vocab_size()
    spec = PreprocessSpec(model_cfg.image_size, list(cfg.mean), list(cfg.std))

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(device)
    set_trainable(model.image_backbone, cfg.image_tune)
    set_trainable(model.text_backbone, cfg.text_tune)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    loss_fn = LOSSES[cfg.loss](cfg.margin, cfg.hard_weight, cfg.t2t_weight)

    start_epoch, step = 0, 0
    if main:
        recover_dir(ckpt)
    distributed.barrier()
    if cfg.resume and (ckpt / "meta.json").is_file():  # every rank loads the same checkpoint
        meta = load_checkpoint(ckpt, model, opt)
        if meta["model_config"] != asdict(model_cfg):
            raise ValueError(f"{ckpt} was trained with another model config; use a new --out "
                             "or --no-resume")
        start_epoch, step = meta["epoch"], meta["step"]
        if main:
            print(f"resuming {out} from epoch {start_epoch} (step {step})")
    if start_epoch >= cfg.epochs:
        if main:
            print(f"{out} already trained for {start_epoch} epochs")
        return out

    img_frozen, txt_frozen = frozen(model.image_backbone), frozen(model.text_backbone)
    cache = Path(cfg.feature_cache) if cfg.feature_cache else out / "features"
    if img_frozen:  # the heads train on features computed once
        train_feats = image_features(model.image_backbone, train_set.paths(), spec, cache,
                                     "train image features")
        val_feats = image_features(model.image_backbone, val_set.paths(), spec, cache,
                                   "val image features")
    else:
        train_images = load_images(train_set.paths(), spec, "train images")
        val_images = load_images(val_set.paths(), spec, "val images")
    text_feats = None
    if txt_frozen:
        text_feats = TextFeatures(model.text_backbone, tok, cache)
        text_feats.warm([t for caps in train_set.captions for _, t, _ in caps]
                        + [t for caps in val_set.captions for _, t, _ in caps])
        text_feats.save()

    def encode_images(rows, train_split: bool) -> torch.Tensor:
        if img_frozen:
            return model.project_image((train_feats if train_split else val_feats)[rows]
                                       .to(device))
        return model.encode_image((train_images if train_split else val_images)[rows].to(device))

    def encode_texts(texts: list[str]) -> torch.Tensor:
        if text_feats is not None:
            return model.project_text(text_feats(texts).to(device))
        ids, mask = tok(texts)
        return model.encode_text(torch.from_numpy(ids).to(device),
                                 torch.from_numpy(mask).to(device))

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        return evaluate_all(
            val_set, lambda rows: torch.cat([encode_images(rows[i: i + 256], False)
                                             for i in range(0, len(rows), 256)]).cpu().numpy(),
            lambda texts: torch.cat([encode_texts(texts[i: i + 256])
                                     for i in range(0, len(texts), 256)]).cpu().numpy(),
            semantic=False)

    net: nn.Module = EncodeBoth(distributed.sync_batchnorm(model),
                                lambda rows: encode_images(rows, True), encode_texts)
    if distributed.is_distributed():
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model_cfg.text_encoder == "hf")  # a BERT's unused pooler
    amp = (nullcontext if PRECISIONS[cfg.precision] is None
           else lambda: torch.autocast(device.type, dtype=PRECISIONS[cfg.precision]))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    csv_path = out / "metrics.csv"
    if main:
        trim_metrics(csv_path, start_epoch)
        (out / "config.json").write_text(json.dumps({"train_config": asdict(cfg),
                                                     "model_config": asdict(model_cfg)},
                                                    indent=2))

    def lr_at(s: int) -> float:
        return warmup_cosine(s, cfg.lr, cfg.warmup_steps, total)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        eval_frozen_stages(model.image_backbone)
        eval_frozen_stages(model.text_backbone)
        t0, losses = time.time(), []
        bar = tqdm(epoch_batches(train_set, cfg, epoch), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                   disable=not main)
        for batch in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            # forward, loss over the global batch, backward (over micro-steps and ranks)
            losses.append(backward_global_batch(net, loss_fn, batch, cfg.grad_accum, amp,
                                                scaler))
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if text_feats is not None:
            text_feats.save()  # this epoch's new texts (edited negatives)
        ranks = {}
        if distributed.is_distributed():  # DDP keeps the ranks' weights equal: check, loudly
            digests = distributed.all_gather_object(distributed.weights_digest(model))
            if len(set(digests)) > 1:
                raise RuntimeError(f"ranks hold different weights after epoch {epoch + 1}: "
                                   f"sha256 {digests}")
            ranks = {"world_size": len(digests), "rank_weights_sha256": digests}
        if not main:
            distributed.barrier()  # while rank 0 evaluates and checkpoints
            continue
        metrics = evaluate()
        row = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
               "lr": lr_at(step), "temperature": float(1 / model.logit_scale.detach().exp()),
               "seconds": round(time.time() - t0, 1), **metrics}
        append_metrics(csv_path, row, first=epoch == 0)
        plot_curves(csv_path, out / "curves.png")
        save_checkpoint(ckpt, model, opt, {"epoch": epoch + 1, "step": step,
                                           "model_config": asdict(model_cfg),
                                           "train_config": asdict(cfg),
                                           "preprocess": spec.to_dict(),
                                           "tokenizer": tok.settings(), "metrics": metrics,
                                           **ranks})
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.3f}  "
              f"val t2i R@1/10 {metrics['t2i_R@1']:.3f}/{metrics['t2i_R@10']:.3f}  "
              f"i2t R@1/10 {metrics['i2t_R@1']:.3f}/{metrics['i2t_R@10']:.3f}  "
              f"({row['seconds']}s)", flush=True)
        distributed.barrier()
    return out
