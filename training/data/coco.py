"""One loader for COCO-format caption data: the shapes world and MS-COCO 2017 alike.

    captions = load_captions("data/shapes/captions_train.json", "data/shapes/images/train")
    captions = load_captions("coco/annotations/captions_train2017.json", "coco/train2017")
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CaptionSet:
    """Images with their captions, in the order of `image_ids`.

    `captions[i]` lists (caption_id, text, claim) for image i; claim is the shapes world's
    structured meaning of the caption, or None for real data.
    """

    image_dir: Path
    image_ids: list[int]
    files: list[str]
    captions: list[list[tuple[int, str, dict | None]]]
    objects: list[list[dict]] = field(default_factory=list)  # shapes world scenes, if known

    def __len__(self) -> int:
        return len(self.image_ids)

    def paths(self) -> list[Path]:
        return [self.image_dir / f for f in self.files]


def _coco(path: Path):
    from pycocotools.coco import COCO

    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress to stdout
        return COCO(str(path))


def load_captions(captions_json: Path | str, image_dir: Path | str,
                  labels_json: Path | str | None = None, limit: int | None = None) -> CaptionSet:
    """Read a COCO captions file (and optionally a shapes-world labels file) with pycocotools.

    Images without captions are skipped; `limit` keeps the first N images by id.
    """
    captions_json, image_dir = Path(captions_json), Path(image_dir)
    coco = _coco(captions_json)
    ids = sorted(i for i in coco.getImgIds() if coco.getAnnIds(imgIds=[i]))
    if limit is not None:
        ids = ids[:limit]
    if not ids:
        raise ValueError(f"{captions_json} holds no captioned images")
    files, caps = [], []
    for img in coco.loadImgs(ids):
        files.append(img["file_name"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        caps.append([(a["id"], a["caption"].strip(), a.get("claim")) for a in anns])
    missing = [f for f in files[:20] if not (image_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"images missing under {image_dir}: {missing[:3]}")
    objects = []
    if labels_json is not None:
        labels = _coco(Path(labels_json))
        objects = [[{k: a[k] for k in ("shape", "color", "size", "x", "y")}
                    for a in labels.loadAnns(labels.getAnnIds(imgIds=[i]))] for i in ids]
    return CaptionSet(image_dir, ids, files, caps, objects)


def load_shapes_split(root: Path | str, split: str, limit: int | None = None) -> CaptionSet:
    """A split of a shapes-world folder written by `training.data.shapes`."""
    root = Path(root)
    return load_captions(root / f"captions_{split}.json", root / "images" / split,
                         root / f"labels_{split}.json", limit)
