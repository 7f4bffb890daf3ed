"""Retrieval metrics, computed the same way for PyTorch and for the bundle (ONNX Runtime + hnswlib).

Embeddings come in as numpy arrays; `search` functions can stand in for exact search, so that the
bundle's hnswlib indexes are measured by the same code.
"""

from __future__ import annotations

from collections.abc import Callable

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
