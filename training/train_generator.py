"""Train the text-to-image generator (training/generator.py) on a trained dual-encoder run.

    python -m training.train_generator --run runs/default/run --data runs/default/data \\
        --out runs/default/generator

The run's encoders stay frozen. Every training caption is embedded once, before the first step,
and cached in out/text_embeddings.npz (keyed by the encoder's weights, so a resumed or repeated
run reuses it); the training images are held in memory as uint8. Each step conditions each
image on one of its captions drawn at random and sums the loss terms: the VAE's reconstruction
and KL (VAELoss); where the data says what each scene holds (the shapes world's labels and the
claims its captions are written from), the sprite decoder's slot terms (SlotLoss: the labelled
layout drawn with the learned sprites, the layers decoded from the posterior against the scene,
and the layers decoded from the prior for a larger batch of captions against their claims);
and, with --match-weight, the match in the joint space that the run's image encoder judges
(MatchLoss). Training resumes from the last epoch's checkpoint; metrics.csv gets one row per
epoch (mean training terms, validation VAE terms).

The defaults train in about 100 s on 2 CPU cores (8000 shapes-world scenes, 6 epochs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

from mmdemo.bundle import recover_dir, sha256_file
from mmdemo.preprocess import PreprocessSpec
from mmdemo.text import TextTokenizer
from training.data.coco import CaptionSet, load_captions, load_shapes_split
from training.generator import (
    ConditionalVAE,
    GeneratorConfig,
    MatchLoss,
    SlotLoss,
    SlotVocabulary,
    VAELoss,
    build_generator,
)
from training.train import (
    append_metrics,
    embed_texts,
    last_checkpoint,
    load_checkpoint,
    load_run,
    save_checkpoint,
    trim_metrics,
    warmup_cosine,
)


@dataclass
class GeneratorTrainConfig:
    run: str = "runs/shapes"  # trained dual-encoder run: its text encoder and tokenizer
    data: str | None = None  # shapes-world folder; default: the run's own data (or its COCO)
    out: str = "runs/shapes-generator"  # checkpoints, metrics.csv, the caption embedding cache
    limit_train: int | None = None  # keep only the first N training images
    limit_val: int | None = None  # keep only the first N validation images
    epochs: int = 10  # passes over the training images
    batch_size: int = 64  # images per step (one caption each)
    lr: float = 2e-3  # peak learning rate (Adam), cosine decay to lr / 20
    warmup_steps: int = 20  # linear warm-up
    grad_clip: float = 5.0  # max global gradient norm
    kl_weight: float = 0.5  # weight of KL(q(z | x, e) || p(z | e)) against the squared error
    free_bits: float = 0.0  # nats per latent dimension the KL term does not penalise
    object_weight: float = 4.0  # extra weight of the objects' pixels in the squared error
    object_threshold: float = 0.45  # a pixel whose brightest channel passes this is an object
    match_weight: float = 0.0  # weight of the term asking samples from the prior to match
    # their captions in the frozen joint space (MatchLoss); 0 turns it off. Off by default: on
    # the shapes world the slot terms teach more (one-object prompts 0.99 without it, 0.97
    # with 20), a third faster, and R-precision stays a judge the generator was not trained
    # against; for data without labels (MS-COCO) try 20
    match_samples: int = 32  # rows of each batch drawn from the prior for that term
    slot_weight: float = 10.0  # sprite decoder on labelled scenes (the shapes world): weight
    # of the term telling each layer, decoded from the posterior, which object to draw
    # (SlotLoss); 0 turns it off
    claim_weight: float = 50.0  # ... and of the term asking layers decoded from the prior to
    # draw what the caption claims; 0 turns it off. Its gradient shares the decoder's first
    # layers with the pixel terms, hundreds of times larger: at 10, two-object prompts were
    # drawn right 0.28 of the time, at 50 0.74
    claim_batch: int = 512  # captions per step for that term (it draws no picture)
    seed: int = 0  # init, order, captions, noise
    threads: int = 0  # torch threads; 0 leaves torch's default
    resume: bool = True  # continue from out/checkpoints/last when present


# ----------------------------------------------------------------------------- data


def load_caption_splits(cfg: GeneratorTrainConfig, run_train: dict
                        ) -> tuple[CaptionSet, CaptionSet]:
    """Training and validation captions: a shapes-world folder, or the run's COCO captions."""
    if cfg.data is None and run_train.get("train_captions"):
        return (load_captions(run_train["train_captions"], run_train["train_images"],
                              limit=cfg.limit_train),
                load_captions(run_train["val_captions"], run_train["val_images"],
                              limit=cfg.limit_val))
    root = Path(cfg.data or run_train["data"])
    if not (root / "captions_train.json").is_file():
        raise FileNotFoundError(f"{root} has no captions_train.json; generate the shapes world "
                                f"with `python -m training.data.shapes --out {root}`")
    return (load_shapes_split(root, "train", cfg.limit_train),
            load_shapes_split(root, "val", cfg.limit_val))


def load_uint8(paths: list[Path], size: int, desc: str = "images") -> np.ndarray:
    """Images as uint8 (N, 3, size, size), RGB, resized (bilinear) where they are not square at
    `size`: the generator's targets, small enough to hold a whole split in memory."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", leave=False)):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(im).transpose(2, 0, 1)
    return out


def caption_embeddings(data: CaptionSet, spine, tok: TextTokenizer, key: str, cache: Path
                       ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every distinct caption embedded once by the frozen text encoder: (float32 (U, D),
    per image an int64 array of rows into it). Read from `cache` when it was written for the
    same encoder (`key`) and the same texts; otherwise computed and written there."""
    texts = sorted({t for caps in data.captions for _, t, _ in caps})
    digest = hashlib.sha256("\n".join([key, *texts]).encode()).hexdigest()
    emb = None
    if cache.is_file():
        with np.load(cache) as f:
            if str(f["key"]) == digest:
                emb = f["embeddings"]
    if emb is None:
        emb = embed_texts(spine, tok, texts)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, key=np.array(digest), embeddings=emb)
        tmp.replace(cache)
    row = {t: i for i, t in enumerate(texts)}
    return emb, [np.array([row[t] for _, t, _ in caps], dtype=np.int64) for caps in data.captions]


def epoch_batches(n: int, batch: int, caption_rows: list[np.ndarray], g: torch.Generator):
    """(image rows, caption embedding rows, which of the image's captions) for one epoch: every
    image once, in a seeded order, each with one of its captions drawn at random."""
    order = torch.randperm(n, generator=g).numpy()
    pick = torch.rand(n, generator=g).numpy()
    for s in range(0, n, batch):
        rows = order[s: s + batch]
        which = np.array([int(pick[r] * len(caption_rows[r])) for r in rows], dtype=np.int64)
        yield rows, np.array([caption_rows[r][j] for r, j in zip(rows, which)]), which


def slot_targets(data: CaptionSet, slots: int, image_size: int
                 ) -> tuple[SlotVocabulary, dict[str, np.ndarray]] | None:
    """SlotLoss targets for every (image, caption) of a shapes-world split: arrays with two
    leading axes (image, caption), as SlotVocabulary.targets gives them per pair; None where
    the split does not say what its scenes hold (MS-COCO) or a scene has more objects than
    the decoder has layers."""
    from mmdemo.oracle import bind
    from training.data.shapes import COLORS, MARGIN, SHAPES, SIZES

    if not data.objects or any(c is None for caps in data.captions for _, _, c in caps):
        return None
    if max(len(objs) for objs in data.objects) > slots:
        return None
    vocab = SlotVocabulary(SHAPES, COLORS, SIZES, image_size, MARGIN, gap=2.0)
    width = max(len(caps) for caps in data.captions)
    rows: list[list[dict[str, np.ndarray]]] = []
    for objs, caps in zip(data.objects, data.captions):
        per = []
        for _, text, claim in caps:
            bound = bind(objs, claim)
            if bound is None:
                raise ValueError(f"the caption {text!r} is not true of its scene")
            rest = sorted((k for k in range(len(objs)) if k not in bound),
                          key=lambda k: objs[k]["x"])
            per.append(vocab.targets(objs, claim, bound + rest, slots))
        per += [per[-1]] * (width - len(per))
        rows.append(per)
    return vocab, {k: np.stack([np.stack([t[k] for t in per]) for per in rows])
                   for k in rows[0][0]}


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 in [0, 1], channels-last (faster convs on the CPU)."""
    return (torch.from_numpy(images).float() / 255).contiguous(memory_format=torch.channels_last)


def frozen_image_encoder(spine, spec: PreprocessSpec
                         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The run's image encoder, frozen, as a differentiable function of images in [0, 1]:
    float32 (N, 3, S, S) -> (N, D), L2-normalised, preprocessed as the run's spec says."""
    spine.eval()
    for p in spine.parameters():
        p.requires_grad_(False)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def encode(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != spec.size:
            x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear",
                              align_corners=False)
        return spine.encode_image((x - mean) / std)

    return encode


# ----------------------------------------------------------------------------- model


def load_generator(gen_dir: Path | str) -> tuple[ConditionalVAE, dict]:
    """A trained generator (eval mode) and its checkpoint meta, from out/."""
    ckpt, meta = last_checkpoint(gen_dir, "python -m training.train_generator")
    model = build_generator(GeneratorConfig(**meta["generator_config"]))
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    return model.eval(), meta


@torch.no_grad()
def validate(model: ConditionalVAE, loss_fn: VAELoss, images: np.ndarray, emb: torch.Tensor,
             caption_rows: list[np.ndarray], bs: int = 256) -> dict[str, float]:
    """Mean loss terms over a split, each image with its first caption, fixed noise."""
    model.eval()
    state = torch.get_rng_state()
    torch.manual_seed(0)
    sums: dict[str, float] = {}
    for s in range(0, len(images), bs):
        x = to_float(images[s: s + bs])
        e = emb[[int(c[0]) for c in caption_rows[s: s + bs]]]
        for k, v in loss_fn(model(x, e), x).items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(x)
    torch.set_rng_state(state)
    return {f"val_{k}": v / len(images) for k, v in sums.items()}


# ----------------------------------------------------------------------------- loop


def train_generator(cfg: GeneratorTrainConfig, gcfg: GeneratorConfig) -> Path:
    """Train to cfg.epochs, resuming from the last checkpoint of cfg.out; returns cfg.out."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoints" / "last"
    spine, meta = load_run(cfg.run)
    train_set, val_set = load_caption_splits(cfg, meta["train_config"])
    tok_cfg = meta["tokenizer"]
    tok = TextTokenizer.from_file(Path(cfg.run) / "tokenizer.json", tok_cfg["max_length"],
                                  tok_cfg["pad_token"])
    gcfg.text_dim = meta["model_config"]["embed_dim"]

    torch.manual_seed(cfg.seed)
    model = build_generator(gcfg).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = VAELoss(cfg.kl_weight, cfg.free_bits, cfg.object_weight, cfg.object_threshold)
    match_fn = None
    if cfg.match_weight > 0:
        match_fn = MatchLoss(frozen_image_encoder(spine, PreprocessSpec.from_dict(
            meta["preprocess"])), float(spine.logit_scale.exp()), cfg.match_weight,
            cfg.match_samples)
    start, step, metrics = 0, 0, {}
    recover_dir(ckpt)
    if cfg.resume and (ckpt / "meta.json").is_file():
        saved = load_checkpoint(ckpt, model, opt)
        free = {"resume", "epochs", "out", "threads"}  # may change between runs
        if (saved["generator_config"] != asdict(gcfg)
                or {k: v for k, v in saved["train_config"].items() if k not in free}
                != {k: v for k, v in asdict(cfg).items() if k not in free}):
            raise ValueError(f"{ckpt} was trained with other settings (an older version's, "
                             f"or other options); use a new --out, --no-resume, or remove "
                             f"{out}")
        start, step, metrics = saved["epoch"], saved["step"], saved["metrics"]
        print(f"resuming {out} from epoch {start} (step {step})")
    if start >= cfg.epochs:
        print(f"{out} already trained for {start} epochs")
        return out
    (out / "config.json").write_text(json.dumps({"train_config": asdict(cfg),
                                                 "generator_config": asdict(gcfg)}, indent=2))

    key = sha256_file(Path(cfg.run) / "checkpoints" / "last" / "model.safetensors")
    emb_np, train_caps = caption_embeddings(train_set, spine, tok, key,
                                            out / "text_embeddings.npz")
    val_emb_np, val_caps = caption_embeddings(val_set, spine, tok, key,
                                              out / "text_embeddings_val.npz")
    emb, val_emb = torch.from_numpy(emb_np), torch.from_numpy(val_emb_np)
    images = load_uint8(train_set.paths(), gcfg.image_size, "train images")
    slot_fn, targets = None, None
    if gcfg.layout == "sprites" and (cfg.slot_weight > 0 or cfg.claim_weight > 0):
        found = slot_targets(train_set, gcfg.slots, gcfg.image_size)
        if found is None and train_set.objects:
            print(f"a scene holds more objects than the decoder's {gcfg.slots} layers "
                  "(--slots): training without the slot terms", flush=True)
        if found is not None:
            vocab, targets = found
            if gcfg.sprites < vocab.classes:
                raise ValueError(f"--sprites {gcfg.sprites}: the data has {vocab.classes} "
                                 "classes of object (shape and size), one sprite each")
            slot_fn = SlotLoss(vocab, cfg.slot_weight, cfg.claim_weight, gcfg.slots,
                               gcfg.sprites)
            pairs = np.array([(i, j) for i, caps in enumerate(train_caps)
                              for j in range(len(caps))])  # every (image, caption)
            pair_rows = np.concatenate(train_caps)  # each pair's caption embedding row
    val_images = load_uint8(val_set.paths(), gcfg.image_size, "val images")

    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_at(s: int) -> float:
        return warmup_cosine(s, cfg.lr, cfg.warmup_steps, total)

    csv_path = out / "metrics.csv"
    trim_metrics(csv_path, start)
    for epoch in range(start, cfg.epochs):
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        t0, sums = time.time(), {}
        bar = tqdm(epoch_batches(len(images), cfg.batch_size, train_caps, g),
                   total=steps_per_epoch, desc=f"generator {epoch + 1}/{cfg.epochs}",
                   unit="step", leave=False)
        for rows, caps, which in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            x = to_float(images[rows])
            e = emb[caps]
            rec = model(x, e)
            terms = loss_fn(rec, x)
            if slot_fn is not None:
                t = {k: torch.from_numpy(v[rows, which]) for k, v in targets.items()}
                truth = model.decoder.draw(slot_fn.truth(t, rec["layers"]["cond"]))
                terms["sprites"] = loss_fn.reconstruction(truth, x)
                # the claim term draws nothing, so it takes many more captions than images
                pick = torch.randint(len(pairs), (cfg.claim_batch,), generator=g).numpy()
                i, j = pairs[pick, 0], pairs[pick, 1]
                claims = {k: torch.from_numpy(v[i, j]) for k, v in targets.items()}
                ce = emb[pair_rows[pick]]
                prior = model.prior_layers(ce, torch.randn(len(ce), gcfg.latent_dim))
                terms.update(slot_fn(rec["layers"], t, prior, claims))
            if match_fn is not None:
                terms.update(match_fn(model, e))
            loss = sum(terms.values())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            bar.set_postfix({k: f"{v.item():.1f}" for k, v in terms.items()})
        n = steps_per_epoch
        metrics = validate(model, loss_fn, val_images, val_emb, val_caps)
        row = {"epoch": epoch + 1, "step": step, "lr": lr_at(step),
               **{f"train_{k}": v / n for k, v in sums.items()},
               "seconds": round(time.time() - t0, 1), **metrics}
        append_metrics(csv_path, row, first=epoch == 0)
        save_checkpoint(ckpt, model, opt, {
            "epoch": epoch + 1, "step": step, "generator_config": asdict(gcfg),
            "train_config": asdict(cfg), "run": str(cfg.run),
            "text_encoder": {"embed_dim": gcfg.text_dim, "weights_sha256": key},
            "metrics": metrics})
        print(f"generator epoch {epoch + 1}/{cfg.epochs}  "
              + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith(("train_",
                                                                                 "val_")))
              + f"  ({row['seconds']}s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    from training.__main__ import _add_fields

    p = argparse.ArgumentParser(prog="python -m training.train_generator",
                                description="Train the text-to-image generator (a conditional "
                                            "VAE) on a dual-encoder run.")
    _add_fields(p, GeneratorTrainConfig)
    _add_fields(p, GeneratorConfig)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if "text_dim" in args:
        p.error("--text-dim is the run's embedding size; it cannot be set")
    names = {f for f in asdict(GeneratorConfig())}
    cfg = GeneratorTrainConfig(**{k: v for k, v in args.items() if k not in names})
    gcfg = GeneratorConfig(**{k: v for k, v in args.items() if k in names})
    try:
        return train_generator(cfg, gcfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
