"""Train the caption decoder on a trained dual-encoder run, with teacher forcing.

    python -m training.train_captioner --run runs/shapes --out runs/shapes-captioner

The run's image backbone is frozen: its maps of every training and validation image are
computed once, so an epoch costs only the decoder. Its tokenizer is the decoder's vocabulary
([CLS] starts a caption, [SEP] ends it). Checkpoints (safetensors), metrics.csv and meta go to
--out; training resumes from the last epoch.
"""

from __future__ import annotations

import argparse
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
from training.captioner import CaptionDecoder, CaptionerModelConfig, build_captioner, caption_loss
from training.data.coco import CaptionSet
from training.data.transforms import load_images
from training.fusion import feature_grid
from training.train import (
    TrainConfig,
    append_metrics,
    last_checkpoint,
    load_checkpoint,
    load_run,
    load_splits,
    save_checkpoint,
    trim_metrics,
    warmup_cosine,
)
from training.train_fusion import image_maps


@dataclass
class CaptionerConfig:
    run: str = "runs/shapes"  # trained dual-encoder run: image backbone, tokenizer, preprocessing
    out: str = "runs/shapes-captioner"  # checkpoints, metrics.csv, config.json
    data: str | None = None  # shapes-world folder; default: the run's own data
    epochs: int = 6  # passes over the training captions
    batch_size: int = 128  # captions per step
    lr: float = 3e-3  # peak learning rate (AdamW), cosine decay to lr / 20
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 50  # linear warm-up
    grad_clip: float = 1.0  # max global gradient norm
    dim: int = 192  # GRU and memory width
    embed: int = 64  # token embedding width
    dropout: float = 0.1  # before the output layer
    smoothing: float = 0.0  # label smoothing of the token loss
    # Shapes world: learn only from captions that name every object of their scene (a caption
    # of a three-object scene naming one object is a true caption but a poor description)
    whole_scene: bool = True
    seed: int = 0  # init and order
    threads: int = 0  # torch threads; 0 leaves torch's default
    resume: bool = True  # continue from out/checkpoints/last when present


# ----------------------------------------------------------------------------- data


def caption_rows(data: CaptionSet, whole_scene: bool) -> tuple[list[int], list[str]]:
    """(image row, caption) pairs to learn from; with whole_scene, on data whose claims and
    scenes are known, only captions that name as many objects as their scene holds."""
    rows, texts = [], []
    for r, caps in enumerate(data.captions):
        keep = [t for _, t, claim in caps
                if not (whole_scene and claim is not None and data.objects)
                or len(claim["mentions"]) == len(data.objects[r])]
        for t in keep or [t for _, t, _ in caps]:  # never leave an image without a caption
            rows.append(r)
            texts.append(t)
    return rows, texts


def special_ids(tok: TextTokenizer) -> dict[str, int]:
    """[CLS] begins, [SEP] ends, the pad token pads; all three must be in the vocabulary."""
    t = tok.tokenizer
    ids = {"bos_id": t.token_to_id("[CLS]"), "eos_id": t.token_to_id("[SEP]"),
           "pad_id": tok.pad_id}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"the run's tokenizer has no {missing}: a caption decoder needs "
                         "[CLS] and [SEP]")
    return ids


# ----------------------------------------------------------------------------- decoding


@torch.no_grad()
def greedy(model: CaptionDecoder, fmap: torch.Tensor, bos: int, eos: int, max_len: int,
           bs: int = 512) -> list[list[int]]:
    """Greedy token ids (without [CLS]/[SEP]) for each map of fmap (N, C, h, w)."""
    model.eval()
    out = []
    for s in range(0, len(fmap), bs):
        memory, h = model.start(fmap[s: s + bs])
        tok = torch.full((len(memory),), bos, dtype=torch.long)
        seqs = torch.zeros(len(memory), max_len, dtype=torch.long)
        done = torch.zeros(len(memory), dtype=torch.bool)
        for t in range(max_len):
            logits, h, _ = model.step(tok, h, memory)
            tok = logits.argmax(1)
            seqs[:, t] = torch.where(done, eos, tok)
            done |= tok == eos
            if done.all():
                break
        for row in seqs.tolist():
            out.append(row[: row.index(eos)] if eos in row else row)
    return out


def val_metrics(model: CaptionDecoder, fmap: torch.Tensor, data: CaptionSet,
                tok: TextTokenizer, ids: dict[str, int], max_len: int) -> dict[str, float]:
    """Greedy captions of the validation images: BLEU-4, CIDEr-D and (shapes world) how well
    they name the objects of the true scenes."""
    from training.caption_metrics import caption_scores

    texts = tok.decode(greedy(model, fmap, ids["bos_id"], ids["eos_id"], max_len))
    refs = {i: [c[1] for c in caps] for i, caps in enumerate(data.captions)}
    out = caption_scores(dict(enumerate(texts)), refs)
    if data.objects:
        from mmdemo.oracle import attribute_scores

        out.update(attribute_scores(texts, data.objects))
    return {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- training


def load_captioner(out_dir: Path | str) -> tuple[CaptionDecoder, dict]:
    """A trained caption decoder (eval mode) and its meta."""
    ckpt, meta = last_checkpoint(out_dir, "python -m training.train_captioner")
    model = build_captioner(CaptionerModelConfig(**meta["model"]))
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    return model.eval(), meta


def train_captioner(cfg: CaptionerConfig) -> Path:
    """Train to cfg.epochs (resuming); returns cfg.out."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spine, meta = load_run(cfg.run)
    tc = dict(meta["train_config"])
    if cfg.data:
        tc.update(data=cfg.data, train_captions=None)
    train_set, val_set = load_splits(TrainConfig(**tc))
    tok_cfg = meta["tokenizer"]
    tok = TextTokenizer.from_file(Path(cfg.run) / "tokenizer.json", tok_cfg["max_length"],
                                  tok_cfg["pad_token"])
    ids = special_ids(tok)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    backbone = spine.image_backbone
    grid = feature_grid(backbone, spec.size)
    mcfg = CaptionerModelConfig(backbone.feature_dim, grid, tok.tokenizer.get_vocab_size(),
                                cfg.dim, cfg.embed, cfg.dropout)
    torch.manual_seed(cfg.seed)
    model = build_captioner(mcfg)
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.ndim >= 2],
                              "weight_decay": cfg.weight_decay},
                             {"params": [p for p in model.parameters() if p.ndim < 2],
                              "weight_decay": 0.0}], lr=cfg.lr)
    out = Path(cfg.out)
    ckpt = out / "checkpoints" / "last"
    start, step, metrics = 0, 0, {}
    recover_dir(ckpt)
    if cfg.resume and (ckpt / "meta.json").is_file():
        saved = json.loads((ckpt / "meta.json").read_text())
        free = {"resume", "epochs", "out", "threads"}  # may change between runs
        if ({k: v for k, v in saved["captioner_config"].items() if k not in free}
                != {k: v for k, v in asdict(cfg).items() if k not in free}):
            raise ValueError(f"{ckpt} was trained with other settings (an older version's, "
                             f"or other options); use a new --out, --no-resume, or remove "
                             f"{out}")
        load_checkpoint(ckpt, model, opt)
        start, step, metrics = saved["epoch"], saved["step"], saved["metrics"]
    if start >= cfg.epochs:
        print(f"captioner: already trained for {start} epochs")
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    print("captioner: image maps of the training and validation images ...", flush=True)
    fmap = image_maps(backbone, load_images(train_set.paths(), spec, "train images"))
    fmap_val = image_maps(backbone, load_images(val_set.paths(), spec, "val images"))
    rows, texts = caption_rows(train_set, cfg.whole_scene)
    tokens, mask = (torch.from_numpy(a) for a in tok(texts))
    tokens = tokens.masked_fill(mask == 0, ids["pad_id"])
    max_len = tok.max_length
    rows_t = torch.tensor(rows)
    steps_per_epoch = -(-len(rows) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch

    def lr_at(s: int) -> float:
        return warmup_cosine(s, cfg.lr, cfg.warmup_steps, total)

    csv_path = out / "metrics.csv"
    trim_metrics(csv_path, start)
    for epoch in range(start, cfg.epochs):
        model.train()
        order = list(range(len(rows)))
        random.Random(f"{cfg.seed}-{epoch}").shuffle(order)
        t0, losses = time.time(), []
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"captioner {epoch + 1}/"
                   f"{cfg.epochs}", unit="step", leave=False)
        for s in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            b = torch.tensor(order[s: s + cfg.batch_size])
            seq = tokens[b]
            n = int((seq != ids["pad_id"]).sum(1).max())  # trim the batch's padding
            seq = seq[:, :n]
            logits = model(fmap[rows_t[b]], seq[:, :-1])
            terms = caption_loss(logits, seq[:, 1:], ids["pad_id"], cfg.smoothing)
            loss = sum(terms.values())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        metrics = val_metrics(model, fmap_val, val_set, tok, ids, max_len)
        row = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
               "seconds": round(time.time() - t0, 1), **metrics}
        append_metrics(csv_path, row, first=epoch == 0)
        save_checkpoint(ckpt, model, opt, {
            "epoch": epoch + 1, "step": step, "captioner_config": asdict(cfg),
            "model": asdict(mcfg), "special": ids, "max_length": max_len,
            "spine_model_config": meta["model_config"], "spine_run": str(cfg.run),
            "preprocess": meta["preprocess"], "tokenizer": meta["tokenizer"],
            "metrics": metrics})
        print(f"captioner epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.3f}  val "
              + "  ".join(f"{k} {metrics[k]:.3f}" for k in ("BLEU-4", "CIDEr-D", "mention_f1")
                          if k in metrics) + f"  ({row['seconds']}s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> Path:
    from training.__main__ import _add_fields

    p = argparse.ArgumentParser(prog="python -m training.train_captioner",
                                description="Train the caption decoder on a dual-encoder run.")
    _add_fields(p, CaptionerConfig)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = CaptionerConfig(**args)
    try:
        return train_captioner(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
