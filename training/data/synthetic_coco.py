"""A small synthetic set in MS-COCO 2017's format, as distributed: `<split>2017/` JPEGs and
`annotations/captions_<split>2017.json` + `instances_<split>2017.json` in the official schema.

One colored shape on a colored background per image, so retrieval is learnable in a few steps.
The COCO recipe's test and the GPU check (`python -m export.device_check`) train on it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230),
          "yellow": (240, 220, 40), "white": (245, 245, 245), "purple": (150, 40, 170)}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (128, 128, 128), "brown": (110, 70, 30),
               "navy": (15, 20, 90)}
SHAPES = {"circle": (1, "disc"), "square": (2, "box"), "triangle": (3, "wedge")}  # id, alias
TEMPLATES = ["a {c} {s} on a {b} background", "{c} {s} over {b}",
             "a picture of a {s} colored {c} against {b}", "there is one {c} {s}, the rest is {b}",
             "{b} backdrop with a {c} {a} in it", "a {c} shape: {s}", "plain {b} and a {s}"]


def write_coco_split(root: Path, split: str, n: int, seed: int) -> tuple[Path, Path, Path]:
    """n JPEGs of one colored shape on a colored background, of varied sizes, with COCO-style
    ids and file names, listed out of id order; 5 captions each (one image has 7, as a few in
    val2017 have 6 or 7) and one instance per image with bbox, area and polygon."""
    rng = random.Random(seed)
    img_dir, ann_dir = root / f"{split}2017", root / "annotations"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(exist_ok=True)
    images, caps, insts = [], [], []
    ids = sorted(rng.sample(range(1, 600_000), n))
    for k, image_id in enumerate(ids):
        c, b, s = rng.choice(list(COLORS)), rng.choice(list(BACKGROUNDS)), rng.choice(list(SHAPES))
        w, h = rng.choice([(96, 72), (72, 96), (80, 80), (100, 64)])
        r = rng.randint(14, 22)
        cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        poly = {"circle": [(cx + r * np.cos(t), cy + r * np.sin(t))
                           for t in np.linspace(0, 2 * np.pi, 16, endpoint=False)],
                "square": [(box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3])],
                "triangle": [(cx, box[1]), (box[2], box[3]), (box[0], box[3])]}[s]
        im = Image.new("RGB", (w, h), BACKGROUNDS[b])
        ImageDraw.Draw(im).polygon(poly, fill=COLORS[c])
        name = f"{image_id:012d}.jpg"
        im.save(img_dir / name, quality=90)
        images.append({"license": 1, "file_name": name, "coco_url": f"http://example/{name}",
                       "height": h, "width": w, "date_captured": "2013-11-14 17:02:52",
                       "flickr_url": "", "id": image_id})
        n_caps = 7 if k == 1 else 5
        for j, t in enumerate(TEMPLATES[:n_caps]):
            caps.append({"image_id": image_id, "id": 1_000_000 + image_id * 10 + j,
                         "caption": " " + t.format(c=c, s=s, b=b, a=SHAPES[s][1]).capitalize()
                                    + "."})
        insts.append({"segmentation": [[float(v) for xy in poly for v in xy]],
                      "area": float(np.pi * r * r if s == "circle" else
                                    (2 * r) ** 2 / (2 if s == "triangle" else 1)),
                      "iscrowd": 0, "image_id": image_id, "bbox": [box[0], box[1], 2 * r, 2 * r],
                      "category_id": SHAPES[s][0], "id": 2_000_000 + image_id})
    rng.shuffle(images)  # the files as distributed are not in id order
    rng.shuffle(caps)
    head = {"info": {"description": f"tiny COCO-format {split}2017", "version": "1.0",
                     "year": 2017, "contributor": "mmdemo tests", "date_created": "2017/09/01"},
            "licenses": [{"url": "http://example/license", "id": 1, "name": "test"}],
            "images": images}
    cats = [{"supercategory": "shape", "id": i, "name": s} for s, (i, _) in SHAPES.items()]
    captions = ann_dir / f"captions_{split}2017.json"
    captions.write_text(json.dumps({**head, "annotations": caps}))
    (ann_dir / f"instances_{split}2017.json").write_text(
        json.dumps({**head, "annotations": insts, "categories": cats}))
    return captions, ann_dir / f"instances_{split}2017.json", img_dir
