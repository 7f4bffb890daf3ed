"""The shapes world: a seeded generator of scenes, captions and questions in COCO format.

Every image holds one to three objects (shape, color, size, position) on a textured background.
Each caption is rendered from a structured *claim* (the objects it mentions, an optional relation,
an optional object count) that is stored beside it, so retrieval, captioning and generation can be
scored exactly: `satisfies(scene, claim)` is the oracle.

    python -m training.data.shapes --out data/shapes --n-train 8000 --n-val 500 --n-test 1000
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from mmdemo.oracle import (  # noqa: F401 (re-exported: the vocabulary and the truth test live there)
    COLORS,
    INVERSE,
    MARGIN,
    RELATIONS,
    SHAPES,
    SIZES,
    _matches,
    relation_holds,
    satisfies,
)
from mmdemo.oracle import polygon as _polygon

CAPTIONS_PER_IMAGE = 5


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase(m: dict, article: bool = True, definite: bool = False) -> str:
    words = [w for w in (m.get("size"), m["color"], m["shape"]) if w]
    text = " ".join(words)
    if definite:
        return "the " + text
    return f"{_article(text)} {text}" if article else text


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# Each template renders a claim into words. `kind` says what claims it can render:
# "one" (a single mention), "all" (every object, with count), "rel" (two mentions + relation),
# "pair" (two mentions, no relation).
TEMPLATES: dict[str, tuple[str, callable]] = {
    "a": ("one", lambda c: phrase(c["mentions"][0])),
    "there_is": ("one", lambda c: f"there is {phrase(c['mentions'][0])} in the picture"),
    "alone": ("all1", lambda c: f"{phrase(c['mentions'][0])} alone on the canvas"),
    "count_list": (
        "all",
        lambda c: f"{NUMBER_WORDS[c['count']]} shapes: "
        + _join([phrase(m) for m in c["mentions"]]),
    ),
    "image_of": ("all", lambda c: "an image of " + _join([phrase(m) for m in c["mentions"]])),
    "pair": ("pair", lambda c: f"{phrase(c['mentions'][0])} and {phrase(c['mentions'][1])}"),
    "next_to": ("pair", lambda c: f"{phrase(c['mentions'][0])} next to {phrase(c['mentions'][1])}"),
    "rel": (
        "rel",
        lambda c: f"{phrase(c['mentions'][0])} {c['relation'][1]} {phrase(c['mentions'][1])}",
    ),
    "the_rel": (
        "rel",
        lambda c: f"{phrase(c['mentions'][0], definite=True)} is {c['relation'][1]} "
        f"{phrase(c['mentions'][1], definite=True)}",
    ),
    "with_rel": ("rel", lambda c: _with_rel(c)),
    "sides": ("rel", lambda c: _sides(c)),
    "contains": ("one", lambda c: f"a picture containing {phrase(c['mentions'][0])}"),
}

_SIDE = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
         "below": ("bottom", "top")}


def _with_rel(c: dict) -> str:
    # "a red circle left of a blue square" said from the square's side:
    # "a blue square with a red circle to its left"
    a, b = c["mentions"]
    rel = c["relation"][1]
    where = {"left of": "to its left", "right of": "to its right", "above": "above it",
             "below": "below it"}[rel]
    return f"{phrase(b)} with {phrase(a)} {where}"


def _sides(c: dict) -> str:
    a, b = c["mentions"]
    s1, s2 = _SIDE[c["relation"][1]]
    return f"on the {s1} is {phrase(a)}, on the {s2} {phrase(b, article=True)}"


def render(claim: dict) -> str:
    """Words for a claim, using the template named in claim["template"]."""
    kind, fn = TEMPLATES[claim["template"]]
    return fn(claim)


def _mention(o: Obj, rng: random.Random, with_size: bool | None = None) -> dict:
    m = {"shape": o.shape, "color": o.color}
    if with_size if with_size is not None else rng.random() < 0.5:
        m["size"] = o.size
    return m


def _candidate_claims(objs: list[Obj], rng: random.Random) -> list[dict]:
    """Every claim a scene can be described by, one per applicable template."""
    out = []
    n = len(objs)
    for name, (kind, _) in TEMPLATES.items():
        if kind == "one" and n <= 2:
            o = rng.choice(objs)
            out.append({"template": name, "mentions": [_mention(o, rng)], "relation": None,
                        "count": None})
        elif kind == "all1" and n == 1:
            out.append({"template": name, "mentions": [_mention(objs[0], rng)], "relation": None,
                        "count": 1})
        elif kind == "all" and n >= 2:
            order = rng.sample(objs, n)
            out.append({"template": name, "mentions": [_mention(o, rng) for o in order],
                        "relation": None, "count": n})
        elif kind == "pair" and n >= 2:
            a, b = rng.sample(objs, 2)
            out.append({"template": name, "mentions": [_mention(a, rng), _mention(b, rng)],
                        "relation": None, "count": None})
        elif kind == "rel" and n >= 2:
            a, b = rng.sample(objs, 2)
            rels = [r for r in RELATIONS if relation_holds(r, asdict(a), asdict(b))]
            if rels:
                out.append({"template": name, "mentions": [_mention(a, rng), _mention(b, rng)],
                            "relation": [0, rng.choice(rels), 1], "count": None})
    return out


def make_captions(objs: list[Obj], rng: random.Random, k: int = CAPTIONS_PER_IMAGE) -> list[dict]:
    """k claims with distinct templates, rendered; mentions that would be ambiguous get a size."""
    cands = _candidate_claims(objs, rng)
    rng.shuffle(cands)
    # Prefer templates that pin the scene down; a partial mention is at most one caption in five.
    full = [c for c in cands if TEMPLATES[c["template"]][0] != "one"]
    part = [c for c in cands if TEMPLATES[c["template"]][0] == "one"]
    chosen = full[: k - 1] + part[:1]
    chosen += [c for c in full[k - 1:] + part[1:]][: k - len(chosen)]
    while len(chosen) < k:  # single-object scenes have few templates: repeat with fresh wording
        extra = _candidate_claims(objs, rng)
        chosen.append(rng.choice(extra))
    out = []
    for c in chosen[:k]:
        c["text"] = render(c)
        out.append(c)
    return out


def perturb(objects: list[dict], claim: dict, rng: random.Random, tries: int = 20,
            binding_share: float = 0.75) -> dict | None:
    """A claim one edit away from `claim` that the scene does NOT satisfy (a hard negative).

    Edits: swap the colors of two mentions, swap their shapes, flip the relation (binding edits,
    chosen with probability `binding_share` where the claim allows one), or change one
    mention's color or shape. Returns None if no false edit was found.
    """
    for _ in range(tries):
        c = json.loads(json.dumps(claim))
        ms = c["mentions"]
        binding = []  # edits that keep the words and change what goes with what
        if len(ms) >= 2:
            binding += ["swap_color", "swap_shape"]
        if c.get("relation"):
            binding += ["flip"]
        edits = binding if binding and rng.random() < binding_share else ["color", "shape"]
        edit = rng.choice(edits)
        if edit == "swap_color" or edit == "swap_shape":
            key = "color" if edit == "swap_color" else "shape"
            i, j = rng.sample(range(len(ms)), 2)
            ms[i][key], ms[j][key] = ms[j][key], ms[i][key]
        elif edit == "flip":
            c["relation"][1] = INVERSE[c["relation"][1]]
        else:
            m = rng.choice(ms)
            pool = list(COLORS) if edit == "color" else SHAPES
            m[edit] = rng.choice([v for v in pool if v != m[edit]])
        if not satisfies(objects, c):
            c["text"] = render(c)
            return c
    return None


def binding_pair(objects: list[dict]) -> tuple[str, str] | None:
    """For a two-object scene of different colors and shapes: (true caption, colors swapped)."""
    if len(objects) != 2:
        return None
    a, b = objects
    if a["color"] == b["color"] or a["shape"] == b["shape"]:
        return None
    true = {"template": "pair", "relation": None, "count": None,
            "mentions": [{"color": a["color"], "shape": a["shape"]},
                         {"color": b["color"], "shape": b["shape"]}]}
    swapped = json.loads(json.dumps(true))
    swapped["mentions"][0]["color"], swapped["mentions"][1]["color"] = b["color"], a["color"]
    return render(true), render(swapped)


# ----------------------------------------------------------------------------- questions


def make_questions(objs: list[Obj], rng: random.Random) -> list[dict]:
    """Questions whose answers need the image and the text together; answers are strings."""
    qs = []
    color = rng.choice(list(COLORS) if rng.random() < 0.5 else [o.color for o in objs])
    qs.append({"type": "count_color", "question": f"how many {color} shapes are there?",
               "answer": str(sum(o.color == color for o in objs))})
    shape = rng.choice(SHAPES if rng.random() < 0.5 else [o.shape for o in objs])
    qs.append({"type": "exists_shape", "question": f"is there {_article(shape)} {shape}?",
               "answer": "yes" if any(o.shape == shape for o in objs) else "no"})
    unique_shapes = [s for s in {o.shape for o in objs} if sum(o.shape == s for o in objs) == 1]
    if unique_shapes:
        s = rng.choice(sorted(unique_shapes))
        o = next(o for o in objs if o.shape == s)
        qs.append({"type": "color_of", "question": f"what color is the {s}?", "answer": o.color})
    pairs = [(a, b, r) for a in objs for b in objs if a is not b for r in RELATIONS
             if relation_holds(r, asdict(a), asdict(b))]
    if pairs:
        a, b, r = rng.choice(pairs)
        # Unambiguous only if exactly one object stands in r to b.
        if sum(relation_holds(r, asdict(o), asdict(b)) for o in objs if o is not b) == 1:
            qs.append({"type": "shape_rel", "answer": a.shape,
                       "question": f"what shape is {r} the {b.color} {b.shape}?"})
    return qs


ANSWERS = ["0", "1", "2", "3", "yes", "no", *COLORS, *SHAPES]
VALUES = ["x", "y", "area"]  # what regression questions ask for; x, y and area are fractions of
# the picture's width, height and area
QUESTION_KINDS = ["count_color", "exists_shape", "color_of", "shape_rel", "position", "area"]


def shape_area(shape: str, size: str) -> float:
    """Area in square pixels of a shape drawn at its nominal radius (rotation leaves it alone)."""
    r = SIZES[size]
    if shape == "circle":
        return math.pi * r * r
    pts = _polygon(shape, 0.0, 0.0, r, 0.0)
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])))


def make_value_questions(objs: list[Obj], rng: random.Random, size: int = 64) -> list[dict]:
    """Questions answered by numbers: where an object is (its centre as fractions of the
    picture's width and height) and how much of the picture it covers."""
    o = rng.choice(objs)
    where = {"type": "position", "question": f"where is the {o.color} {o.shape}?",
             "answer": None, "values": {"x": round(o.x / size, 4), "y": round(o.y / size, 4)}}
    o = rng.choice(objs)
    area = {"type": "area", "answer": None,
            "question": f"how much of the picture does the {o.color} {o.shape} cover?",
            "values": {"area": round(shape_area(o.shape, o.size) / (size * size), 5)}}
    return [where, area]


# ----------------------------------------------------------------------------- drawing


def draw_scene(objs: list[Obj], rng: random.Random, size: int = 64) -> Image.Image:
    """An RGB image of the objects on a dark, textured background."""
    scale = 4  # draw large, then downsample: smooth edges
    base = tuple(rng.randint(10, 70) for _ in range(3))
    top = tuple(max(0, min(90, c + rng.randint(-30, 30))) for c in base)
    img = Image.new("RGB", (size * scale, size * scale), base)
    d = ImageDraw.Draw(img)
    for row in range(size * scale):  # vertical gradient
        t = row / (size * scale)
        d.line([(0, row), (size * scale, row)],
               fill=tuple(int(base[i] * (1 - t) + top[i] * t) for i in range(3)))
    for _ in range(rng.randint(0, 6)):  # faint speckles
        cx, cy, rr = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1, 4)
        c = tuple(max(0, min(100, b + rng.randint(-25, 25))) for b in base)
        d.ellipse([(cx - rr) * scale, (cy - rr) * scale, (cx + rr) * scale, (cy + rr) * scale],
                  fill=c)
    for o in objs:
        rgb = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[o.color])
        r = SIZES[o.size] * rng.uniform(0.92, 1.08)
        if o.shape == "circle":
            d.ellipse([(o.x - r) * scale, (o.y - r) * scale, (o.x + r) * scale,
                       (o.y + r) * scale], fill=rgb)
        else:
            rot = rng.uniform(-0.15, 0.15)
            pts = _polygon(o.shape, o.x * scale, o.y * scale, r * scale, rot)
            d.polygon(pts, fill=rgb)
    return img.resize((size, size), Image.BILINEAR)


def sample_scene(rng: random.Random, size: int = 64) -> list[Obj]:
    """One to three objects, no two alike in (color, shape), not overlapping."""
    n = rng.choice([1, 2, 2, 3, 3])
    while True:
        objs: list[Obj] = []
        seen = set()
        for _ in range(n):
            for _attempt in range(50):
                shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
                sz = rng.choice(list(SIZES))
                r = SIZES[sz]
                x, y = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
                clear = all(math.hypot(x - o.x, y - o.y) > r + SIZES[o.size] + 2 and
                            (abs(x - o.x) >= 2 * MARGIN or abs(y - o.y) >= 2 * MARGIN)
                            for o in objs)
                if clear and (shape, color) not in seen:
                    objs.append(Obj(shape, color, sz, round(x, 1), round(y, 1)))
                    seen.add((shape, color))
                    break
        if len(objs) == n:
            return objs


# ----------------------------------------------------------------------------- writing


def generate_split(out: Path, split: str, n: int, seed: int, size: int = 64,
                   image_id_start: int = 1) -> None:
    """Write `n` scenes of one split: images/<split>/*.png and the captions and labels JSONs."""
    rng = random.Random(f"{seed}-{split}")
    qrng = random.Random(f"{seed}-{split}-values")  # its own stream: scenes stay as they were
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, caps, insts, questions = [], [], [], []
    cap_id = image_id_start * CAPTIONS_PER_IMAGE
    for k in tqdm(range(n), desc=f"shapes {split}", unit="scene", leave=False):
        image_id = image_id_start + k
        objs = sample_scene(rng, size)
        fname = f"{split}_{image_id:07d}.png"
        draw_scene(objs, rng, size).save(img_dir / fname)
        images.append({"id": image_id, "file_name": fname, "width": size, "height": size})
        for c in make_captions(objs, rng):
            caps.append({"id": cap_id, "image_id": image_id, "caption": c.pop("text"),
                         "claim": c})
            cap_id += 1
        for j, o in enumerate(objs):
            r = SIZES[o.size]
            insts.append({"id": image_id * 4 + j, "image_id": image_id,
                          "category_id": SHAPES.index(o.shape) + 1,
                          "bbox": [round(o.x - r, 1), round(o.y - r, 1), 2 * r, 2 * r],
                          "area": (2 * r) ** 2, "iscrowd": 0, **asdict(o)})
        for q in make_questions(objs, rng):
            questions.append({"id": len(questions) + 1, "image_id": image_id, **q,
                              "answer_id": ANSWERS.index(q["answer"])})
        for q in make_value_questions(objs, qrng, size):
            questions.append({"id": len(questions) + 1, "image_id": image_id, **q,
                              "answer_id": -1})
    info = {"description": f"mmdemo shapes world, split {split}", "version": "1",
            "seed": seed}
    cats = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    (out / f"captions_{split}.json").write_text(json.dumps(
        {"info": info, "licenses": [], "images": images, "annotations": caps}))
    (out / f"labels_{split}.json").write_text(json.dumps(
        {"info": info, "licenses": [], "images": images, "annotations": insts,
         "categories": cats, "questions": questions, "answers": ANSWERS, "values": VALUES,
         "question_kinds": QUESTION_KINDS}))


@dataclass
class ShapesConfig:
    out: str = "data/shapes"  # output folder
    n_train: int = 8000  # scenes in the training split
    n_val: int = 500  # scenes in the validation split
    n_test: int = 1000  # scenes in the test split
    seed: int = 0  # the whole data set follows from it
    size: int = 64  # image side in pixels


def generate(cfg: ShapesConfig) -> Path:
    """Write the three splits in COCO format under cfg.out; returns that folder."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = 1
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test)):
        generate_split(out, split, n, cfg.seed, cfg.size, image_id_start=start)
        start += n
    (out / "shapes_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m training.data.shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f, default in asdict(ShapesConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(default), default=default)
    args = p.parse_args(argv)
    cfg = ShapesConfig(**vars(args))
    for name in ("n_train", "n_val", "n_test"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.size < 32:
        p.error(f"--size must be at least 32 pixels, got {cfg.size}")
    out = generate(cfg)
    print(f"wrote {cfg.n_train}/{cfg.n_val}/{cfg.n_test} scenes to {out}")
    return out


if __name__ == "__main__":
    main()
