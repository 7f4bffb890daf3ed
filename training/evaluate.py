"""Retrieval metrics, computed the same way for PyTorch and for the bundle (ONNX Runtime + hnswlib).

Embeddings come in as numpy arrays; `search` functions can stand in for exact search, so that the
bundle's hnswlib indexes are measured by the same code.

    python -m training.evaluate --run runs/coco --captions coco/annotations/captions_val2017.json \
        --images coco/val2017 --limit 5000 --out runs/coco/coco5k.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from math import comb
from pathlib import Path

import numpy as np

from training.data.coco import CaptionSet
from training.data.shapes import binding_pair, satisfies

Search = Callable[[np.ndarray, int], np.ndarray]  # queries (Q, D), k -> indices (Q, k)


def exact_search(gallery: np.ndarray) -> Search:
    """Top-k rows of `gallery` by inner product, best first."""

    def search(q: np.ndarray, k: int) -> np.ndarray:
        s = q @ gallery.T
        k = min(k, s.shape[1])
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(s, top, 1).argsort(1)[:, ::-1]
        return np.take_along_axis(top, order, 1)

    return search


def flatten_captions(data: CaptionSet) -> tuple[list[str], np.ndarray, list[dict | None]]:
    """All captions as texts, the row of each caption's image, and each caption's claim."""
    texts, rows, claims = [], [], []
    for i, caps in enumerate(data.captions):
        for _, text, claim in caps:
            texts.append(text)
            rows.append(i)
            claims.append(claim)
    return texts, np.asarray(rows), claims


def retrieval_metrics(img: np.ndarray, txt: np.ndarray, txt_rows: np.ndarray,
                      texts: list[str] | None = None, ks: tuple[int, ...] = (1, 5, 10),
                      t2i: Search | None = None, i2t: Search | None = None) -> dict[str, float]:
    """Recall@K both ways under the COCO protocol.

    img float32 (N, D), txt float32 (M, D), txt_rows int (M,) the image row of each caption.
    Text -> image: a hit when the caption's own image is in the top K. Image -> text: a hit when
    any of the image's own captions is in the top K. With `texts`, a retrieved caption whose
    words equal one of the image's own captions is a hit too: identical strings have identical
    embeddings, and which copy a search returns first is arbitrary.
    """
    t2i = t2i or exact_search(img)
    i2t = i2t or exact_search(txt)
    kmax = max(ks)
    top_i = t2i(txt, kmax)  # (M, K) image rows
    top_t = i2t(img, kmax)  # (N, K) caption rows
    if texts is not None:
        key_of = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        keys = np.array([key_of[t] for t in texts])
        own = [set() for _ in range(len(img))]
        for r, key in zip(txt_rows, keys):
            own[r].add(key)
        hit_t = np.array([[keys[c] in own[i] for c in row] for i, row in enumerate(top_t)])
    else:
        hit_t = txt_rows[top_t] == np.arange(len(img))[:, None]
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = float((top_i[:, :k] == txt_rows[:, None]).any(1).mean())
        out[f"i2t_R@{k}"] = float(hit_t[:, :k].any(1).mean())
    out["rsum"] = float(sum(v for k, v in out.items() if "R@" in k))
    return out


def _quick_filter(objects: list[list[dict]]) -> list[set]:
    return [{(o["color"], o["shape"]) for o in objs} for objs in objects]


def semantic_precision(img: np.ndarray, txt: np.ndarray, claims: list[dict],
                       objects: list[list[dict]], k: int = 10, t2i: Search | None = None
                       ) -> dict[str, float]:
    """Text -> image precision@k judged by the oracle: the share of the top k scenes that satisfy
    every attribute, relation and count the query caption states.

    `semantic_P@k` divides by min(k, R), R the number of gallery scenes that satisfy the caption,
    so that a caption only R < k scenes satisfy can still score 1; `semantic_P@k_raw` divides by k.
    """
    t2i = t2i or exact_search(img)
    top = t2i(txt, k)
    keys = _quick_filter(objects)
    norm, raw = [], []
    for q, claim in enumerate(claims):
        need = {(m["color"], m["shape"]) for m in claim["mentions"]}
        relevant = sum(1 for j, objs in enumerate(objects)
                       if need <= keys[j] and satisfies(objs, claim))
        hits = sum(satisfies(objects[j], claim) for j in top[q])
        norm.append(hits / max(1, min(k, relevant)))
        raw.append(hits / k)
    return {f"semantic_P@{k}": float(np.mean(norm)), f"semantic_P@{k}_raw": float(np.mean(raw))}


def binding_pairs(objects: list[list[dict]]) -> tuple[list[int], list[str], list[str]]:
    """Rows of two-object scenes with different colors and shapes, their true captions and the
    captions with the two colors swapped."""
    rows, true, swapped = [], [], []
    for i, objs in enumerate(objects):
        pair = binding_pair(objs)
        if pair:
            rows.append(i)
            true.append(pair[0])
            swapped.append(pair[1])
    return rows, true, swapped


def binding_accuracy(img: np.ndarray, true: np.ndarray, swapped: np.ndarray) -> float:
    """Share of scenes whose image scores its true caption above the color-swapped one.
    img, true, swapped: float32 (P, D), row-aligned."""
    return float(((img * true).sum(1) > (img * swapped).sum(1)).mean())


def evaluate_all(data: CaptionSet, encode_images: Callable[[list[int]], np.ndarray],
                 encode_texts: Callable[[list[str]], np.ndarray], t2i: Search | None = None,
                 i2t: Search | None = None, semantic: bool = True) -> dict[str, float]:
    """Every retrieval measure on one split. encode_images takes image rows of `data`."""
    texts, rows, claims = flatten_captions(data)
    img = encode_images(list(range(len(data))))
    txt = encode_texts(texts)
    out = retrieval_metrics(img, txt, rows, texts, t2i=t2i, i2t=i2t)
    if semantic and data.objects and all(c is not None for c in claims):
        out.update(semantic_precision(img, txt, claims, data.objects, t2i=t2i))
        b_rows, b_true, b_swap = binding_pairs(data.objects)
        if b_rows:
            out["binding_acc"] = binding_accuracy(img[b_rows], encode_texts(b_true),
                                                  encode_texts(b_swap))
            out["binding_n"] = len(b_rows)
    return out


# ----------------------------------------------------------------------------- fused tasks


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve, as the mean of precision at each positive's rank
    (scikit-learn's average_precision_score without interpolation). scores, positive: (N,)."""
    order = np.argsort(-scores, kind="stable")
    hit = positive[order] > 0
    if not hit.any():
        return float("nan")
    precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
    return float(precision[hit].mean())


def task_metrics(pred: dict[str, np.ndarray], tasks) -> dict[str, float]:
    """Scores of fused predictions on a TaskSet (training.data.tasks).

    Multi-class: accuracy over the items that ask a class, and per kind (acc_<kind>).
    Multi-label: mAP over classes with a positive, and micro-F1 at probability 0.5.
    Values: mean absolute error and R² per value (mae_<name>, r2_<name>); mae_position is the
    mean of |dx| and |dy| over the items that ask a position. kind_accuracy: the kind head.
    """
    out: dict[str, float] = {}
    logits, labels = pred["logits"], tasks.labels
    if tasks.multilabel:
        aps = [average_precision(logits[:, c], labels[:, c]) for c in range(labels.shape[1])]
        out["mAP"] = float(np.nanmean(aps))
        guess = logits > 0.0  # sigmoid(logit) > 0.5
        tp = float((guess & (labels > 0)).sum())
        out["micro_f1"] = 2 * tp / max(1.0, float(guess.sum() + (labels > 0).sum()))
    else:
        keep = labels >= 0
        right = logits.argmax(1) == labels
        out["accuracy"] = float(right[keep].mean()) if keep.any() else float("nan")
        for k, name in enumerate(tasks.kind_names):
            sel = keep & (tasks.kinds == k)
            if sel.any():
                out[f"acc_{name}"] = float(right[sel].mean())
    err = np.abs(pred["values"] - tasks.values)  # NaN where not asked
    for j, name in enumerate(tasks.value_names):
        asked = np.isfinite(tasks.values[:, j])
        if not asked.any():
            continue
        y = tasks.values[asked, j]
        out[f"mae_{name}"] = float(err[asked, j].mean())
        ss = float(((y - y.mean()) ** 2).sum())
        out[f"r2_{name}"] = 1.0 - float((err[asked, j] ** 2).sum()) / ss if ss > 0 else float("nan")
    if {"x", "y"} <= set(tasks.value_names):
        jx, jy = tasks.value_names.index("x"), tasks.value_names.index("y")
        asked = np.isfinite(tasks.values[:, jx]) & np.isfinite(tasks.values[:, jy])
        if asked.any():
            out["mae_position"] = float(err[asked][:, [jx, jy]].mean())
    kinds = pred.get("kinds")
    if kinds is not None and len(tasks.kind_names) > 1 and np.abs(kinds).max() > 0:
        out["kind_accuracy"] = float((kinds.argmax(1) == tasks.kinds).mean())
    return out


# ----------------------------------------------------------------------------- COCO 5k protocol

COCO_PROTOCOL = ("COCO 5k: the first {limit} captioned images of the file by image id, the first "
                 "{per_image} captions of each in the file's order; Recall@K both ways by caption "
                 "id (t2i: the caption's own image in the top K; i2t: any of the image's own "
                 "captions in the top K), exact inner-product search")


def first_captions(data: CaptionSet, n: int | None = 5) -> CaptionSet:
    """The same images with only the first n captions of each (all with n None), in the order
    the annotation file lists them: the COCO 5k protocol scores 5 captions an image, and the
    few val2017 images with 6 or 7 keep their first 5."""
    if n is None:
        return data
    if n < 1:
        raise ValueError(f"captions per image {n}; expected 1 or more (or None for all)")
    return replace(data, captions=[caps[:n] for caps in data.captions])


def recall_chance(caps_per_image: list[int], ks: tuple[int, ...] = (1, 5, 10)
                  ) -> dict[str, float]:
    """Recall@K of a ranking drawn at random, for N images with the given caption counts:
    t2i K/N; i2t the mean over images of 1 - C(M - c, K) / C(M, K), M captions in all."""
    n, m = len(caps_per_image), sum(caps_per_image)
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = min(1.0, k / n)
        kk = min(k, m)
        out[f"i2t_R@{k}"] = float(np.mean([1 - comb(m - c, kk) / comb(m, kk)
                                           for c in caps_per_image]))
    return out


def recall_table(metrics: dict[str, float], chance: dict[str, float] | None = None,
                 ks: tuple[int, ...] = (1, 5, 10)) -> str:
    """Recall@K both ways as a text table, in percent as papers print them."""
    head = f"{'':16}" + "".join(f"{f'R@{k}':>8}" for k in ks)
    rows = [head]
    for key, name in (("i2t", "image -> text"), ("t2i", "text -> image")):
        rows.append(f"{name:16}" + "".join(f"{100 * metrics[f'{key}_R@{k}']:8.1f}" for k in ks))
        if chance:
            rows.append(f"{'  chance':16}"
                        + "".join(f"{100 * chance[f'{key}_R@{k}']:8.1f}" for k in ks))
    rows.append(f"{'rsum':16}{100 * metrics['rsum']:8.1f}")
    return "\n".join(rows)


def _embed_run(run: Path, data: CaptionSet, batch_size: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """A trained run's image and caption embeddings of `data` through PyTorch, images read in
    batches (5k images at 224 px would take 3 GB at once); returns img (N, D), txt (M, D),
    each caption's image row (M,), and the run's checkpoint meta."""
    from mmdemo.preprocess import PreprocessSpec
    from mmdemo.text import TextTokenizer
    from training.data.transforms import image_batches
    from training.train import embed_images, embed_texts, load_run

    model, meta = load_run(run)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    tok_cfg = meta["tokenizer"]
    tok = TextTokenizer.from_file(run / "tokenizer.json", tok_cfg["max_length"],
                                  tok_cfg["pad_token"])
    parts = [embed_images(model, x, batch_size)
             for x in image_batches(data.paths(), spec, batch_size)]
    texts, rows, _ = flatten_captions(data)
    txt = embed_texts(model, tok, texts, batch_size)
    return np.concatenate(parts), txt, rows, meta


def main(argv: list[str] | None = None) -> dict:
    """python -m training.evaluate: Recall@1/5/10 both ways of a trained run on a COCO-format
    captions file under the COCO 5k protocol; prints a table and writes JSON (fractions)."""
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Recall@1/5/10 both ways of a trained run on a COCO captions file, under the "
                    "COCO 5k protocol; prints a table and writes JSON (fractions in [0, 1]).")
    p.add_argument("--run", type=Path, required=True,
                   help="a folder written by `python -m training`")
    p.add_argument("--captions", type=Path, required=True,
                   help="COCO captions JSON, e.g. annotations/captions_val2017.json")
    p.add_argument("--images", type=Path, required=True, help="its image folder, e.g. val2017")
    p.add_argument("--limit", type=int, default=5000,
                   help="first N captioned images by image id (default 5000: all of val2017)")
    p.add_argument("--captions-per-image", type=int, default=5,
                   help="first N captions of each image in the file's order (default 5; 0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 leaves the default")
    p.add_argument("--out", type=Path, default=None, help="write the metrics here as JSON")
    args = p.parse_args(argv)
    if args.limit < 1 or args.batch_size < 1 or args.captions_per_image < 0:
        p.error(f"--limit {args.limit}, --batch-size {args.batch_size} and --captions-per-image "
                f"{args.captions_per_image}: the first two must be 1 or more, the last 0 or more")
    from training.data.coco import load_captions

    try:
        data = first_captions(load_captions(args.captions, args.images, limit=args.limit),
                              args.captions_per_image or None)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        img, txt, rows, meta = _embed_run(args.run, data, args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    metrics = retrieval_metrics(img, txt, rows)  # strict: by caption id, never by equal words
    per_image = [len(c) for c in data.captions]
    chance = recall_chance(per_image)
    result = {
        "protocol": COCO_PROTOCOL.format(limit=args.limit,
                                         per_image=args.captions_per_image or "all"),
        "through": "pytorch",
        "run": str(args.run), "trained_epochs": meta.get("epoch"),
        "captions": str(args.captions), "images": str(args.images),
        "n_images": len(data), "n_captions": int(sum(per_image)),
        "captions_per_image": {str(c): per_image.count(c) for c in sorted(set(per_image))},
        "metrics": metrics, "chance": chance,
        "image_ids": data.image_ids,
    }
    note = "" if len(data) == args.limit else f" (fewer than --limit {args.limit})"
    print(f"{args.captions.name}: {len(data)} images{note}, {result['n_captions']} captions, "
          f"run {args.run} (epoch {meta.get('epoch')})")
    print(recall_table(metrics, chance))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"metrics written to {args.out}")
    return result


if __name__ == "__main__":
    main()
