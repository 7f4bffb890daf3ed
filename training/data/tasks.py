"""(image, text, answer) sets for fused classification and regression, read with pycocotools.

    tasks = load_shapes_tasks("data/shapes", "train")          # questions with answers
    tasks = load_coco_tasks("annotations/captions_val2017.json",
                            "annotations/instances_val2017.json", "val2017")

The shapes world's labels file holds questions whose answer is a class ("what color is the
square?" -> "blue") or numbers ("where is the red circle?" -> x, y). On MS-COCO an item is an
image with one of its captions, labelled with the set of supercategories present (multi-label),
and, where the caption names a category, the number of its annotated instances.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.coco import _coco


@dataclass
class TaskSet:
    """N items over a set of images. `labels` is int64 (N,) with -1 where an item asks no class
    (multi-class), or float32 (N, C) of 0/1 (multi-label); `values` is float32 (N, R) with NaN
    where an item asks no such number."""

    image_dir: Path
    image_ids: list[int]  # distinct images
    files: list[str]  # file of each distinct image
    item_image: np.ndarray  # int64 (N,): row of each item's image in image_ids
    texts: list[str]  # (N,) question or caption
    kinds: np.ndarray  # int64 (N,): index into kind_names
    labels: np.ndarray
    values: np.ndarray
    class_names: list[str]
    value_names: list[str]
    kind_names: list[str]

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.texts)

    def paths(self) -> list[Path]:
        return [self.image_dir / f for f in self.files]

    def meta(self) -> dict:
        """What a bundle needs to read the heads' outputs: the names of classes, values and
        kinds, and for each kind whether a class answers it and which values do."""
        answers = {}
        for k, name in enumerate(self.kind_names):
            sel = self.kinds == k
            has_class = self.multilabel or bool((self.labels[sel] >= 0).any())
            vals = [v for j, v in enumerate(self.value_names)
                    if np.isfinite(self.values[sel, j]).any()]
            answers[name] = {"class": has_class, "values": vals}
        return {"classes": self.class_names, "values": self.value_names,
                "kinds": self.kind_names, "multilabel": self.multilabel, "answers": answers}


def load_shapes_tasks(root: Path | str, split: str, limit: int | None = None) -> TaskSet:
    """The questions of a shapes-world split (labels_<split>.json); `limit` keeps the first N
    images by id."""
    root = Path(root)
    coco = _coco(root / f"labels_{split}.json")
    ds = coco.dataset
    if "questions" not in ds:
        raise ValueError(f"{root / f'labels_{split}.json'} holds no questions; regenerate it "
                         "with `python -m training.data.shapes`")
    ids = sorted(coco.getImgIds())[:limit]
    row = {i: r for r, i in enumerate(ids)}
    value_names = ds.get("values", [])
    kind_names = ds.get("question_kinds") or sorted({q["type"] for q in ds["questions"]})
    qs = [q for q in ds["questions"] if q["image_id"] in row]
    values = np.full((len(qs), len(value_names)), np.nan, dtype=np.float32)
    for n, q in enumerate(qs):
        for name, v in (q.get("values") or {}).items():
            values[n, value_names.index(name)] = v
    return TaskSet(
        image_dir=root / "images" / split, image_ids=ids,
        files=[im["file_name"] for im in coco.loadImgs(ids)],
        item_image=np.array([row[q["image_id"]] for q in qs], dtype=np.int64),
        texts=[q["question"] for q in qs],
        kinds=np.array([kind_names.index(q["type"]) for q in qs], dtype=np.int64),
        labels=np.array([q["answer_id"] for q in qs], dtype=np.int64),
        values=values, class_names=list(ds["answers"]), value_names=list(value_names),
        kind_names=list(kind_names))


def _category_patterns(names: list[str]) -> list[tuple[re.Pattern, str]]:
    """Word patterns for category names, singular or plural, longest names first so that
    "hot dog" wins over "dog"."""
    pats = []
    for name in sorted(names, key=len, reverse=True):
        words = r"\s+".join(re.escape(w) for w in name.split())
        pats.append((re.compile(rf"\b{words}(?:s|es)?\b", re.IGNORECASE), name))
    return pats


def named_category(caption: str, patterns: list[tuple[re.Pattern, str]]) -> str | None:
    """The category the caption names first (by position in the text), or None."""
    found = [(m.start(), name) for pat, name in patterns if (m := pat.search(caption))]
    return min(found)[1] if found else None


def load_coco_tasks(captions_json: Path | str, instances_json: Path | str,
                    image_dir: Path | str, limit: int | None = None) -> TaskSet:
    """MS-COCO 2017 (or any COCO-format set with captions and instances): one item per
    (image, caption), labelled with the supercategories present; `values` holds the number of
    instances of the category the caption names ("two dogs on a couch" -> dogs: 2), NaN when it
    names none. Images without captions are skipped; `limit` keeps the first N images by id."""
    caps, inst = _coco(Path(captions_json)), _coco(Path(instances_json))
    cats = inst.loadCats(inst.getCatIds())
    if not cats:
        raise ValueError(f"{instances_json} lists no categories")
    supers = sorted({c["supercategory"] for c in cats})
    super_of = {c["id"]: supers.index(c["supercategory"]) for c in cats}
    cat_id = {c["name"]: c["id"] for c in cats}
    patterns = _category_patterns(list(cat_id))
    ids = sorted(i for i in caps.getImgIds() if caps.getAnnIds(imgIds=[i]))[:limit]
    if not ids:
        raise ValueError(f"{captions_json} holds no captioned images")
    item_image, texts, labels, values = [], [], [], []
    for r, i in enumerate(ids):
        anns = inst.loadAnns(inst.getAnnIds(imgIds=[i], iscrowd=None))
        present = np.zeros(len(supers), dtype=np.float32)
        present[[super_of[a["category_id"]] for a in anns]] = 1.0
        for a in caps.loadAnns(caps.getAnnIds(imgIds=[i])):
            name = named_category(a["caption"], patterns)
            n = (sum(x["category_id"] == cat_id[name] for x in anns) if name is not None
                 else np.nan)
            item_image.append(r)
            texts.append(a["caption"].strip())
            labels.append(present)
            values.append([n])
    image_dir = Path(image_dir)
    files = [im["file_name"] for im in caps.loadImgs(ids)]
    missing = [f for f in files[:20] if not (image_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"images missing under {image_dir}: {missing[:3]}")
    return TaskSet(image_dir=image_dir, image_ids=ids, files=files,
                   item_image=np.array(item_image, dtype=np.int64), texts=texts,
                   kinds=np.zeros(len(texts), dtype=np.int64), labels=np.stack(labels),
                   values=np.array(values, dtype=np.float32), class_names=supers,
                   value_names=["count"], kind_names=["supercategories"])
