"""Train fusion models (and the two single-modality baselines) on a trained dual-encoder run.

    python -m training.train_fusion --run runs/shapes --out runs/shapes-fusion
    python -m training.train_fusion --run runs/coco --out runs/coco-fusion \\
        --train-captions coco/annotations/captions_train2017.json \\
        --train-instances coco/annotations/instances_train2017.json --train-images coco/train2017 \\
        --val-captions ... --val-instances ... --val-images ...

Each method gets out/<method>/ with checkpoints (safetensors), metrics.csv and meta; training
resumes from the last epoch. With the image encoder frozen (the default) its maps are computed
once per split, so every method trains in seconds per epoch on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from mmdemo.bundle import recover_dir
from mmdemo.preprocess import PreprocessSpec
from mmdemo.text import TextTokenizer
from training.data.tasks import TaskSet, load_coco_tasks, load_shapes_tasks
from training.data.transforms import load_images
from training.evaluate import task_metrics
from training.fusion import METHODS, FusionModel, feature_grid, fusion_loss
from training.models import ModelConfig, build_model
from training.train import (
    append_metrics,
    last_checkpoint,
    load_checkpoint,
    load_run,
    save_checkpoint,
    trim_metrics,
    warmup_cosine,
)


@dataclass
class FusionConfig:
    run: str = "runs/shapes"  # trained dual-encoder run: its encoders, tokenizer, preprocessing
    out: str = "runs/shapes-fusion"  # one folder per method inside
    data: str | None = None  # shapes-world folder; default: the run's own
    train_captions: str | None = None  # COCO captions JSON; with the next five: COCO instead
    train_instances: str | None = None  # COCO instances JSON of the training images
    train_images: str | None = None  # training image folder
    val_captions: str | None = None  # COCO captions JSON for validation
    val_instances: str | None = None  # COCO instances JSON for validation
    val_images: str | None = None  # validation image folder
    limit_train: int | None = None  # keep only the first N training images
    limit_val: int | None = None  # keep only the first N validation images
    methods: str = ",".join(METHODS)  # comma-separated, from training.fusion.METHODS
    epochs: int = 4  # passes over the training items
    batch_images: int = 48  # images per step, each with all of its items (about 5 on shapes)
    lr: float = 2e-3  # peak learning rate (AdamW), cosine decay to lr / 20
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_steps: int = 50  # linear warm-up
    grad_clip: float = 1.0  # max global gradient norm
    dim: int = 128  # width of the fusion layers
    heads: int = 4  # attention heads
    layers: int = 2  # cross-attention blocks
    freeze_image: bool = True  # keep the image encoder as trained; False fine-tunes it
    freeze_text: bool = True  # keep the text encoder as trained; False fine-tunes it
    value_weight: float = 5.0  # weight of the L1 term on regression values
    a_endpoints: float = 0.2  # weighted_sum: share of batches at a = 0 and (again) at a = 1
    seed: int = 0  # init, order, a
    threads: int = 0  # torch threads; 0 leaves torch's default
    resume: bool = True  # continue from out/<method>/checkpoints/last when present

    def method_list(self) -> list[str]:
        got = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in got if m not in METHODS]
        if bad or not got:
            raise ValueError(f"methods {self.methods!r}; choose from {METHODS}")
        return got


# ----------------------------------------------------------------------------- data


def load_task_splits(cfg: FusionConfig, spine_train: dict) -> tuple[TaskSet, TaskSet]:
    coco = [cfg.train_captions, cfg.train_instances, cfg.train_images, cfg.val_captions,
            cfg.val_instances, cfg.val_images]
    if any(coco):
        if not all(coco):
            raise ValueError("COCO fusion needs --train-captions, --train-instances, "
                             "--train-images, --val-captions, --val-instances and --val-images")
        return (load_coco_tasks(cfg.train_captions, cfg.train_instances, cfg.train_images,
                                cfg.limit_train),
                load_coco_tasks(cfg.val_captions, cfg.val_instances, cfg.val_images,
                                cfg.limit_val))
    root = Path(cfg.data or spine_train["data"])
    if not (root / "labels_train.json").is_file():
        raise FileNotFoundError(f"{root} has no labels_train.json; generate the shapes world "
                                f"with `python -m training.data.shapes --out {root}`")
    return (load_shapes_tasks(root, "train", cfg.limit_train),
            load_shapes_tasks(root, "val", cfg.limit_val))


def image_batches(tasks: TaskSet, n_images: int, rng: random.Random):
    """Item rows of `n_images` shuffled images at a time, all items of each image together, so
    a step computes each image's map once."""
    items: list[list[int]] = [[] for _ in tasks.image_ids]
    for r, i in enumerate(tasks.item_image):
        items[i].append(r)
    order = list(range(len(items)))
    rng.shuffle(order)
    for s in range(0, len(order), n_images):
        rows = [r for i in order[s: s + n_images] for r in items[i]]
        if rows:
            yield rows


def sample_a(rng: random.Random, endpoints: float) -> float:
    """a for one weighted_sum batch: 0 or 1 each with probability `endpoints`, else uniform, so
    that every a in [0, 1] gives sensible outputs and the ends are the single modalities."""
    u = rng.random()
    return 0.0 if u < endpoints else 1.0 if u < 2 * endpoints else rng.random()


# ----------------------------------------------------------------------------- models


def build_fusion(method: str, spine, meta: dict, task: dict, cfg: FusionConfig) -> FusionModel:
    """A fusion model over copies of the spine's backbones, frozen as configured."""
    img, txt = copy.deepcopy(spine.image_backbone), copy.deepcopy(spine.text_backbone)
    grid = feature_grid(img, meta["model_config"]["image_size"])
    model = FusionModel(img, txt, method, grid, len(task["classes"]), len(task["values"]),
                        len(task["kinds"]), cfg.dim, cfg.heads, cfg.layers)
    for p in img.parameters():
        p.requires_grad_(not cfg.freeze_image)
    for p in txt.parameters():
        p.requires_grad_(not cfg.freeze_text)
    return model


def set_train_mode(model: FusionModel, cfg: FusionConfig) -> None:
    """Training mode, except frozen backbones (their BatchNorm statistics stay as trained)."""
    model.train()
    if cfg.freeze_image:
        model.image_backbone.eval()
    if cfg.freeze_text:
        model.text_backbone.eval()


def load_fusion(method_dir: Path | str) -> tuple[FusionModel, dict]:
    """A trained fusion model (eval mode) and its meta, from out/<method>/."""
    ckpt, meta = last_checkpoint(method_dir, "python -m training.train_fusion")
    spine = build_model(ModelConfig(**meta["spine_model_config"]))
    g = meta["model"]
    model = FusionModel(spine.image_backbone, spine.text_backbone, meta["method"], g["grid"],
                        len(meta["task"]["classes"]), len(meta["task"]["values"]),
                        len(meta["task"]["kinds"]), g["dim"], g["heads"], g["layers"])
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    return model.eval(), meta


@torch.no_grad()
def image_maps(backbone: torch.nn.Module, images: torch.Tensor, bs: int = 256) -> torch.Tensor:
    """Backbone maps (N, C, h, w) of preprocessed images, in eval mode."""
    was = backbone.training
    backbone.eval()
    out = torch.cat([backbone.forward_features(images[i: i + bs])
                     for i in range(0, len(images), bs)])
    backbone.train(was)
    return out


class Inputs:
    """One split ready for a model: distinct images (preprocessed, or their backbone maps when
    the image encoder is frozen) and distinct texts (token ids, and their token states when
    the text encoder is frozen); items point into both."""

    def __init__(self, tasks: TaskSet, images: torch.Tensor, tok: TextTokenizer, spine,
                 cfg: FusionConfig):
        self.maps = cfg.freeze_image
        self.x = image_maps(spine.image_backbone, images) if self.maps else images
        texts, self.item_text = np.unique(np.array(tasks.texts, dtype=object),
                                          return_inverse=True)
        ids, mask = tok(list(texts))
        self.ids, self.mask = torch.from_numpy(ids), torch.from_numpy(mask)
        self.tokens = None
        if cfg.freeze_text:
            with torch.no_grad():
                spine.text_backbone.eval()
                self.tokens = torch.cat([
                    spine.text_backbone.forward_tokens(self.ids[i: i + 512],
                                                       self.mask[i: i + 512])
                    for i in range(0, len(texts), 512)])
        self.item_image = tasks.item_image

    def run(self, model: FusionModel, rows, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's outputs for item rows, each distinct image and text computed once."""
        uimg, iidx = np.unique(self.item_image[rows], return_inverse=True)
        utxt, tidx = np.unique(self.item_text[rows], return_inverse=True)
        fmap = tokens = None
        if model.method != "text_only":
            fmap = self.x[uimg] if self.maps else model.image_features(self.x[uimg])
        if model.method != "image_only":
            tokens = (self.tokens[utxt] if self.tokens is not None
                      else model.text_backbone.forward_tokens(self.ids[utxt], self.mask[utxt]))
        return model.forward_from(fmap, tokens, self.mask[utxt], a,
                                  torch.from_numpy(iidx.reshape(-1)),
                                  torch.from_numpy(tidx.reshape(-1)))


@torch.no_grad()
def predict(model: FusionModel, inputs: Inputs, n: int, a: float = 0.5, bs: int = 512
            ) -> dict[str, np.ndarray]:
    """Outputs for every item (numpy), in item order."""
    model.eval()
    outs: dict[str, list] = {}
    for s in range(0, n, bs):
        rows = np.arange(s, min(s + bs, n))
        for k, v in inputs.run(model, rows, torch.full((len(rows),), float(a))).items():
            outs.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


# ----------------------------------------------------------------------------- loop


def train_method(method: str, cfg: FusionConfig, spine, meta: dict, train_set: TaskSet,
                 val_set: TaskSet, images: dict[str, torch.Tensor], tok: TextTokenizer,
                 shared: dict[str, Inputs] | None) -> dict:
    """Train one method to cfg.epochs (resuming); returns its last validation metrics."""
    out = Path(cfg.out) / method
    ckpt = out / "checkpoints" / "last"
    task = train_set.meta()
    torch.manual_seed(cfg.seed)
    model = build_fusion(method, spine, meta, task, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2],
                              "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2],
                              "weight_decay": 0.0}], lr=cfg.lr)
    start, step, metrics = 0, 0, {}
    recover_dir(ckpt)
    if cfg.resume and (ckpt / "meta.json").is_file():
        saved = load_checkpoint(ckpt, model, opt)
        free = {"resume", "epochs", "out", "methods", "threads"}  # may change between runs
        if ({k: v for k, v in saved["fusion_config"].items() if k not in free}
                != {k: v for k, v in asdict(cfg).items() if k not in free}):
            raise ValueError(f"{ckpt} was trained with other settings (an older version's, "
                             f"or other options); use a new --out, --no-resume, or remove "
                             f"{out}")
        start, step, metrics = saved["epoch"], saved["step"], saved["metrics"]
    if start >= cfg.epochs:
        print(f"{method}: already trained for {start} epochs")
        return metrics
    # frozen encoders: maps and token states computed once and shared by every method;
    # fine-tuned: this model's own backbones run on the pixels and ids at every step
    inp = shared
    if inp is None:
        inp = {"train": Inputs(train_set, images["train"], tok, model, cfg),
               "val": Inputs(val_set, images["val"], tok, model, cfg)}
    steps_per_epoch = -(-len(train_set.image_ids) // cfg.batch_images)
    total = cfg.epochs * steps_per_epoch
    labels = torch.from_numpy(train_set.labels)
    values = torch.from_numpy(train_set.values)
    kinds = torch.from_numpy(train_set.kinds)

    def lr_at(s: int) -> float:
        return warmup_cosine(s, cfg.lr, cfg.warmup_steps, total)

    csv_path = out / "metrics.csv"
    out.mkdir(parents=True, exist_ok=True)
    trim_metrics(csv_path, start)
    for epoch in range(start, cfg.epochs):
        set_train_mode(model, cfg)
        rng = random.Random(f"{cfg.seed}-{method}-{epoch}")
        t0, losses = time.time(), []
        bar = tqdm(image_batches(train_set, cfg.batch_images, rng), total=steps_per_epoch,
                   desc=f"{method} {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for rows in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            rows_t = torch.tensor(rows)
            a = torch.full((len(rows),), sample_a(rng, cfg.a_endpoints))
            o = inp["train"].run(model, np.array(rows), a)
            terms = fusion_loss(o, labels[rows_t], values[rows_t], kinds[rows_t],
                                cfg.value_weight)
            loss = sum(terms.values())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        pred = predict(model, inp["val"], len(val_set))
        metrics = task_metrics(pred, val_set)
        row = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
               "seconds": round(time.time() - t0, 1), **metrics}
        append_metrics(csv_path, row, first=epoch == 0)
        save_checkpoint(ckpt, model, opt, {
            "epoch": epoch + 1, "step": step, "method": method, "fusion_config": asdict(cfg),
            "spine_model_config": meta["model_config"], "spine_run": str(cfg.run),
            "model": {"grid": list(model.grid), "dim": cfg.dim, "heads": cfg.heads,
                      "layers": cfg.layers},
            "preprocess": meta["preprocess"], "tokenizer": meta["tokenizer"], "task": task,
            "metrics": metrics})
        head = (f"acc {metrics['accuracy']:.3f}" if "accuracy" in metrics
                else f"mAP {metrics['mAP']:.3f}")
        print(f"{method} epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.3f}  "
              f"val {head}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                          if k.startswith("mae_")) + f"  ({row['seconds']}s)",
              flush=True)
    return metrics


def train_fusion(cfg: FusionConfig) -> Path:
    """Train every method of cfg.methods; returns cfg.out."""
    methods = cfg.method_list()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spine, meta = load_run(cfg.run)
    train_set, val_set = load_task_splits(cfg, meta["train_config"])
    tok_cfg = meta["tokenizer"]
    tok = TextTokenizer.from_file(Path(cfg.run) / "tokenizer.json", tok_cfg["max_length"],
                                  tok_cfg["pad_token"])
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (out / "task.json").write_text(json.dumps(train_set.meta(), indent=2))
    images = {"train": load_images(train_set.paths(), spec, "train images"),
              "val": load_images(val_set.paths(), spec, "val images")}
    shared = None  # frozen encoders: computed once here for every method
    if cfg.freeze_image and cfg.freeze_text:
        shared = {"train": Inputs(train_set, images["train"], tok, spine, cfg),
                  "val": Inputs(val_set, images["val"], tok, spine, cfg)}
    summary = {}
    for method in methods:
        summary[method] = train_method(method, cfg, spine, meta, train_set, val_set, images,
                                       tok, shared)
    (out / "val_metrics.json").write_text(json.dumps(summary, indent=2))
    return out


def main(argv: list[str] | None = None) -> Path:
    from training.__main__ import _add_fields

    p = argparse.ArgumentParser(prog="python -m training.train_fusion",
                                description="Train fusion models on a dual-encoder run.")
    _add_fields(p, FusionConfig)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = FusionConfig(**args)
    try:
        return train_fusion(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
