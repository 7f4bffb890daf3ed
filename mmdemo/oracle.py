"""The shapes world's oracle: its vocabulary, the truth test for claims, a scene parser and a
caption reader. No learning anywhere: every threshold follows from how the generator draws.

`satisfies(scene, claim)` says whether a scene (object dicts) makes a claim true.
`parse_scene(image)` reads the objects back out of a picture (color segmentation, connected
components, the radial profile of each component), so a picture drawn by a model can be graded
the way a rendered one is. `read_caption(text)` turns a caption written in the generator's grammar
back into a claim, and `attribute_scores` says whether captions name what a scene holds.

    python -m mmdemo.oracle IMAGE [IMAGE ...]
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "gray": (140, 140, 140),
}
SIZES = {"small": 7.0, "large": 12.0}  # circumradius in pixels at 64x64
RELATIONS = ["left of", "right of", "above", "below"]
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MARGIN = 6.0  # a relation holds when the centres differ by at least this many pixels on its axis


def polygon(shape: str, x: float, y: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a non-circle shape of circumradius `r` centred at (x, y), turned by `rot`
    radians; the generator draws with it and the parser derives its expectations from it."""
    if shape == "square":
        pts = [(r * 0.8 * math.cos(rot + math.pi / 4 + k * math.pi / 2),
                r * 0.8 * math.sin(rot + math.pi / 4 + k * math.pi / 2)) for k in range(4)]
        pts = [(px * 1.15, py * 1.15) for px, py in pts]
    elif shape == "triangle":
        pts = [(r * math.cos(rot - math.pi / 2 + k * 2 * math.pi / 3),
                r * math.sin(rot - math.pi / 2 + k * 2 * math.pi / 3)) for k in range(3)]
    elif shape == "hexagon":
        pts = [(r * math.cos(rot + k * math.pi / 3), r * math.sin(rot + k * math.pi / 3))
               for k in range(6)]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else r * 0.45) * math.cos(rot - math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else r * 0.45) * math.sin(rot - math.pi / 2 + k * math.pi / 5))
               for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(x + px, y + py) for px, py in pts]


# ----------------------------------------------------------------------------- the truth test


def relation_holds(rel: str, a: dict, b: dict) -> bool:
    """Whether object `a` stands in relation `rel` to object `b` (dicts with x, y)."""
    if rel == "left of":
        return b["x"] - a["x"] >= MARGIN
    if rel == "right of":
        return a["x"] - b["x"] >= MARGIN
    if rel == "above":
        return b["y"] - a["y"] >= MARGIN
    if rel == "below":
        return a["y"] - b["y"] >= MARGIN
    raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}")


def _matches(obj: dict, mention: dict) -> bool:
    return all(obj[k] == v for k, v in mention.items() if k in ("shape", "color", "size"))


def bind(objects: list[dict], claim: dict) -> list[int] | None:
    """Indices of the distinct objects a claim's mentions bind to, with its relation holding
    between the objects bound to mentions i and j: the first such binding in object order;
    None when there is none. The count is not looked at."""
    mentions = claim["mentions"]
    rel = claim.get("relation")

    def assign(used: list[int]) -> list[int] | None:
        if len(used) == len(mentions):
            if rel is None:
                return used
            a, r, b = rel
            return used if relation_holds(r, objects[used[a]], objects[used[b]]) else None
        for k, obj in enumerate(objects):
            if k not in used and _matches(obj, mentions[len(used)]):
                found = assign(used + [k])
                if found is not None:
                    return found
        return None

    return assign([])


def satisfies(objects: list[dict], claim: dict) -> bool:
    """The oracle: does a scene (list of object dicts) satisfy every statement of a claim?

    A claim is {"mentions": [{"shape", "color", optional "size"}...], "relation": [i, rel, j] or
    None, "count": n or None}. Mentions bind to distinct objects; the relation holds between the
    objects bound to mentions i and j; count is the exact number of objects in the scene.
    """
    if claim.get("count") is not None and claim["count"] != len(objects):
        return False
    return bind(objects, claim) is not None


# ----------------------------------------------------------------------------- reading pictures

# How the generator draws (draw_scene in training/data/shapes.py); the thresholds follow from it.
FRAME = 64  # the picture's side in pixels; positions are reported in this frame
BACKGROUND_MAX = 100  # no channel of the background or its speckles exceeds this
JITTER = 15  # a drawn color is its palette color +- this per channel
RADIUS_JITTER = (0.92, 1.08)  # a drawn circumradius is its size's times a factor in this range

# An object's brightest channel is at least min(max(rgb)) - JITTER = 125, the background's at most
# 100: a pixel is foreground past the midpoint, which also puts the mask's edge where an
# antialiased rim is half covered.
FOREGROUND = (BACKGROUND_MAX + min(max(c) for c in COLORS.values()) - JITTER) / 2
# Seeds to grow objects from: pixels at least CORE covered by their object (a rim between two
# touching objects is about half covered), in parts of MIN_CORE pixels or more (a small star's
# core keeps about ten); an object splits in two only where two parts of MIN_SPLIT pixels appear.
CORE = 0.75
MIN_CORE = 3
MIN_SPLIT = 8
# Brightness scales a palette color may be seen at: a blurred or dimmed object still reads as its
# hue, while gray (0.57 of white) stays gray.
SCALE_RANGE = (0.75, 1.1)
N_ANGLES = 64  # rays of the radial profile
STEP = 0.125  # pixels between samples along a ray
# Ripple a drawn circle's radial profile picks up from the pixel grid, per harmonic (under 0.08 px
# drawn, 0.11 px blurred by 1.5 px): a polygon must bend its outline further than this to read as
# one (a small hexagon's flats bend it by 0.3 px).
NOISE_PX = 0.1


def _unit_profile(shape: str, n: int = N_ANGLES) -> np.ndarray:
    """Distance from the centre to the edge of a unit-circumradius shape along n evenly spaced
    rays: float64 (n,)."""
    theta = np.arange(n) * 2 * np.pi / n
    if shape == "circle":
        return np.ones(n)
    pts = np.array(polygon(shape, 0.0, 0.0, 1.0, 0.0))  # (V, 2)
    a, b = pts, np.roll(pts, -1, axis=0)
    d = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # (n, 2)
    e = b - a  # (V, 2)
    # ray t*d meets edge a + u*e: solve [d, -e] [t, u]^T = a for every (ray, edge)
    det = d[:, None, 0] * -e[None, :, 1] + e[None, :, 0] * d[:, None, 1]  # (n, V)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (a[None, :, 0] * -e[None, :, 1] + e[None, :, 0] * a[None, :, 1]) / det
        u = (d[:, None, 0] * a[None, :, 1] - d[:, None, 1] * a[None, :, 0]) / det
    t = np.where((t > 0) & (u >= -1e-9) & (u <= 1 + 1e-9), t, np.inf)
    return t.min(axis=1)


def _harmonics(profile: np.ndarray) -> np.ndarray:
    """Amplitudes of the 3rd to 6th angular harmonics of a radial profile over its mean:
    float64 (4,). Rotation leaves them alone; a circle has none, a k-fold shape peaks at k."""
    f = np.abs(np.fft.rfft(profile)) / len(profile)
    return 2 * f[3:7] / max(f[0], 1e-9)


def _unit_area(shape: str) -> float:
    if shape == "circle":
        return math.pi
    pts = polygon(shape, 0.0, 0.0, 1.0, 0.0)
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])))


UNIT_AREA = {s: _unit_area(s) for s in SHAPES}  # area of each shape at circumradius 1
HARMONICS = {s: _harmonics(_unit_profile(s)) for s in SHAPES}  # what each shape's outline holds
# Small or large: the geometric mean of the largest small radius and the smallest large one.
SIZE_SPLIT = math.sqrt(SIZES["small"] * RADIUS_JITTER[1] * SIZES["large"] * RADIUS_JITTER[0])
# Specks: under half the smallest object the generator draws.
MIN_AREA = 0.5 * min(UNIT_AREA.values()) * (SIZES["small"] * RADIUS_JITTER[0]) ** 2


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A picture as float32 (64, 64, 3) in 0..255, resized (bilinear) if it is another size."""
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image array has dtype {image.dtype}; expected uint8")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array has shape {image.shape}; expected (H, W, 3)")
        img = Image.fromarray(image, "RGB")
    else:
        raise TypeError(f"image is a {type(image).__name__}; expected a PIL image or uint8 array")
    if img.size != (FRAME, FRAME):
        img = img.resize((FRAME, FRAME), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _dilate(a: np.ndarray, k: int) -> np.ndarray:
    """Maximum over a (2k+1)-square around each pixel of a bool or float (H, W) array."""
    out = a.copy()
    h, w = a.shape
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            dst = out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
            np.maximum(dst, a[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)], out=dst)
    return out


def _median5(a: np.ndarray) -> np.ndarray:
    """Median over the 5x5 square around each pixel of a float (H, W) array (edges repeated)."""
    h, w = a.shape
    pad = np.pad(a, 2, mode="edge")
    return np.median([pad[dy:dy + h, dx:dx + w] for dy in range(5) for dx in range(5)], axis=0)


def _erode(mask: np.ndarray) -> np.ndarray:
    """Erosion of a bool (H, W) mask by a 3x3 square (outside the picture counts as off)."""
    return ~_dilate(~mask, 1) & mask


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool (H, W) mask: int32 (H, W) labels (0 off, 1..n, numbered
    in raster order of their first pixel) and n. Runs of each row are joined to the runs they
    touch in the row above (union-find), so the work goes with the runs, not the pixels."""
    h, w = mask.shape
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # (H, W + 1)
    ys, x0s = (a.tolist() for a in np.nonzero(edges == 1))  # run starts, raster order
    x1s = np.nonzero(edges == -1)[1].tolist()  # run ends (exclusive), same order
    parent = list(range(len(ys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above: list[int] = []  # runs of the previous row
    here: list[int] = []
    row = -1
    for i, (y, x0, x1) in enumerate(zip(ys, x0s, x1s)):
        if y != row:
            above, here = (here if y == row + 1 else []), []
            row = y
        for j in above:
            if x0s[j] <= x1 and x1s[j] >= x0:  # overlapping or diagonal neighbours
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
        here.append(i)
    labels = np.zeros((h, w), dtype=np.int32)
    ids: dict[int, int] = {}
    for i, (y, x0, x1) in enumerate(zip(ys, x0s, x1s)):
        labels[y, x0:x1] = ids.setdefault(root(i), len(ids) + 1)
    return labels, len(ids)


def _background(img: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """The background as a vertical gradient: float32 (H, 1, 3), a line per channel through the
    per-row medians of the pixels away from the foreground (robust to speckles)."""
    bg_px = ~_dilate(fg, 2)  # (H, W)
    count = bg_px.sum(axis=1)  # (H,)
    rows = np.flatnonzero(count >= 8)
    if len(rows) < 2:
        dark = img.reshape(-1, 3)
        dark = dark[dark.max(axis=1) <= np.median(dark.max(axis=1))]
        return np.broadcast_to(np.median(dark, axis=0), (img.shape[0], 1, 3)).astype(np.float32)
    ordered = np.sort(np.where(bg_px[:, :, None], img, np.inf), axis=1)[rows]  # (R, W, 3)
    lo = np.take_along_axis(ordered, ((count[rows] - 1) // 2)[:, None, None], axis=1)[:, 0]
    hi = np.take_along_axis(ordered, (count[rows] // 2)[:, None, None], axis=1)[:, 0]
    slope, icpt = np.polyfit(rows.astype(np.float64), (lo + hi) / 2.0, 1)  # (3,), (3,)
    ys = np.arange(img.shape[0], dtype=np.float64)[:, None]
    return (icpt + slope * ys)[:, None, :].astype(np.float32)


def _nearest_color(rgb: np.ndarray) -> str:
    """The palette color nearest a float (3,) RGB, each palette color allowed a brightness scale
    in SCALE_RANGE."""
    best, best_d = "gray", np.inf
    for name, c in COLORS.items():
        c = np.asarray(c, dtype=np.float64)
        s = np.clip(float(rgb @ c) / float(c @ c), *SCALE_RANGE)
        d = float(np.linalg.norm(rgb - s * c))
        if d < best_d:
            best, best_d = name, d
    return best


def _sample(alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of float (H, W) `alpha` at pixel-index coordinates; 0 outside."""
    h, w = alpha.shape
    pad = np.pad(alpha, 1)
    ys, xs = np.clip(ys + 1, 0, h + 0.999), np.clip(xs + 1, 0, w + 0.999)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    y1, x1 = np.minimum(y0 + 1, h + 1), np.minimum(x0 + 1, w + 1)
    return ((1 - fy) * ((1 - fx) * pad[y0, x0] + fx * pad[y0, x1])
            + fy * ((1 - fx) * pad[y1, x0] + fx * pad[y1, x1]))


def _radial_profile(alpha: np.ndarray, cx: float, cy: float, reach: float) -> np.ndarray:
    """Distance from (cx, cy) (pixels, picture frame) to the outermost half-coverage crossing of
    `alpha` (float (H, W) in 0..1) along N_ANGLES rays out to `reach`: float64 (N_ANGLES,)."""
    theta = np.arange(N_ANGLES) * 2 * np.pi / N_ANGLES
    t = np.arange(0.0, reach + STEP, STEP)  # (T,)
    xs = cx - 0.5 + np.cos(theta)[:, None] * t  # pixel i covers [i, i + 1): its centre is i + 0.5
    ys = cy - 0.5 + np.sin(theta)[:, None] * t
    a = _sample(alpha, ys, xs)  # (N_ANGLES, T)
    inside = a >= 0.5
    last = np.where(inside.any(axis=1), inside.shape[1] - 1 - np.argmax(inside[:, ::-1], 1), 0)
    nxt = np.minimum(last + 1, len(t) - 1)
    rows = np.arange(N_ANGLES)
    a0, a1 = a[rows, last], a[rows, nxt]
    frac = np.where(a0 > a1, (a0 - 0.5) / np.maximum(a0 - a1, 1e-9), 0.0)
    return t[last] + np.clip(frac, 0.0, 1.0) * STEP


def _classify_shape(profile: np.ndarray) -> str:
    """The shape whose harmonics best explain the radial profile's (float (N_ANGLES,) pixels).

    Each polygon's harmonics may be scaled down to a tenth, as blur rounds its corners; what is
    left over counts only beyond NOISE_PX per harmonic, the ripple a drawn circle picks up from the
    pixel grid. The circle (no harmonics) wins ties: a polygon must bend its outline further.
    """
    mean_r = float(profile.mean())
    h = _harmonics(profile) * mean_r  # (4,) pixels

    def excess(residual: np.ndarray) -> float:
        return float(np.linalg.norm(np.maximum(np.abs(residual) - NOISE_PX, 0.0)))

    best, best_d = "circle", excess(h)
    for shape, p in HARMONICS.items():
        if shape == "circle":
            continue
        p = p * mean_r
        s = np.clip(float(h @ p) / float(p @ p), 0.1, 1.0)
        d = excess(h - s * p)
        if d < best_d:
            best, best_d = shape, d
    return best


def _grow(seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seed labels (int32 (H, W), 0 = none) grown through a bool (H, W) mask, all at once and
    a pixel a step (8-neighbours), so touching objects split where their fronts meet."""
    labels = seeds.copy()
    while True:
        near = _dilate(labels, 1)  # a neighbour's label (the larger where fronts meet)
        new = mask & (labels == 0) & (near > 0)
        if not new.any():
            return labels
        labels = np.where(new, near, labels)


def _segment(img: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, int]:
    """Objects of a bool (H, W) foreground: int32 (H, W) labels 1..n (0 background, -1 the
    faint pixels where two objects meet) and n.

    Each object grows from a core: foreground pixels off the mask's edge (an eroded component),
    split further where it holds two parts standing at least CORE of the way from the background
    to the typical brightness around them (5x5 median), so objects whose antialiased rims touch
    (the generator lets two large ones come within 0.1 px) come apart. Foreground with no core
    of its own (thin strokes) keeps its plain components.
    img float32 (H, W, 3), bg float32 (H, 1, 3).
    """
    inner = _erode(fg)
    cores, n = _label(inner)  # one per object unless rims touch
    bright = img.max(axis=2)  # (H, W)
    floor = bg.max(axis=2)  # (H, 1)
    covered = bright - floor >= CORE * (_median5(bright) - floor)
    strong, m = _label(inner & covered)
    big = np.flatnonzero(np.bincount(strong.ravel(), minlength=m + 1)[1:] >= MIN_SPLIT) + 1
    parent = np.zeros(m + 1, dtype=np.int64)  # the core each strong part lies in
    parent[strong.ravel()] = cores.ravel()
    parts = np.bincount(parent[big], minlength=n + 1)  # big strong parts per core
    seeds = np.zeros_like(cores)
    k = 0
    for c in range(1, n + 1):
        inside = [j for j in big if parent[j] == c] if parts[c] >= 2 else []
        for piece in [strong == j for j in inside] or [cores == c]:
            if piece.sum() >= MIN_CORE:
                k += 1
                seeds[piece] = k
    labels = _grow(seeds, fg)
    # Where two grown objects meet, the faint pixels between them are partly both: neither's.
    above = np.where(labels > 0, labels, k + 1)
    meets = (_dilate(labels, 1) != labels) | (-_dilate(-above, 1) != above)
    labels = np.where((labels > 0) & meets & ~covered, -1, labels)
    rest, m = _label(fg & (labels == 0))
    labels = np.where(rest > 0, rest + k, labels)
    return labels, k + m


def parse_scene(image: Image.Image | np.ndarray) -> list[dict]:
    """The objects in a shapes-world picture, left to right.

    image: a PIL image or a uint8 array (H, W, 3); another size than 64x64 is resized (bilinear)
    and positions are reported in the 64-pixel frame. Returns dicts {"shape", "color", "size",
    "x", "y"} (x, y: float centre in pixels), possibly none. Any picture gets a best-effort reading.

    Foreground is what is brighter than the generator's background can be; touching objects
    are split by growing each from its core; an object's color is the palette color nearest the
    median of its interior pixels; its coverage of each pixel (0..1, rims included) gives its
    area and centre; its shape is read from the harmonics of its radial profile and its size
    from its area and shape.
    """
    img = _as_array(image)  # (64, 64, 3)
    fg = img.max(axis=2) > FOREGROUND
    bg = _background(img, fg)  # (64, 1, 3)
    labels, n = _segment(img, fg, bg)
    areas = np.bincount(np.maximum(labels, 0).ravel(), minlength=n + 1)
    speck = areas[np.maximum(labels, 0)] < MIN_AREA
    labels = np.where((labels > 0) & speck, 0, labels)  # specks go back to the background
    interior_all = _erode(fg)
    ys, xs = np.mgrid[0:FRAME, 0:FRAME] + 0.5  # pixel centres, (64, 64) each
    out = []
    for k in range(1, n + 1):
        comp = labels == k
        if not comp.any():
            continue
        px = img[comp & interior_all]  # away from the antialiased rim
        if len(px) < 3:  # thin or tiny: its brightest pixels are its purest
            px = img[comp]
            px = px[px.max(axis=1) >= np.percentile(px.max(axis=1), 75)]
        rgb = np.median(px, axis=0).astype(np.float64)
        # Coverage: where each pixel lies between the background and the object's color.
        region = _dilate(comp, 2) & ((labels == 0) | comp)
        d = rgb - bg  # (64, 1, 3)
        dd = (d * d).sum(axis=2)  # (64, 1)
        alpha = np.clip(((img - bg) * d).sum(axis=2) / np.maximum(dd, 1e-6), 0.0, 1.0)
        alpha = np.where(dd > 100.0, alpha, comp)  # an object too like its background: its mask
        alpha = np.where(region, alpha, 0.0)  # (64, 64)
        area = float(alpha.sum())
        if area < 1.0:
            alpha, area = comp.astype(np.float64), float(comp.sum())
        cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
        profile = _radial_profile(alpha, cx, cy, reach=2.0 * math.sqrt(area / math.pi) + 2.0)
        shape = _classify_shape(profile)
        radius = math.sqrt(area / UNIT_AREA[shape])
        out.append({"shape": shape, "color": _nearest_color(rgb),
                    "size": "small" if radius < SIZE_SPLIT else "large",
                    "x": round(cx, 2), "y": round(cy, 2)})
    return sorted(out, key=lambda o: o["x"])


def scene_matches(parsed: list[dict], truth: list[dict], tol: float = 2.0) -> bool:
    """Whether two scenes (object dicts with shape, color, size, x, y) hold the same objects: as
    many, paired one to one with equal shape, color and size and centres within `tol` pixels."""
    if len(parsed) != len(truth):
        return False

    def same(a: dict, b: dict) -> bool:
        return (all(a[k] == b[k] for k in ("shape", "color", "size"))
                and math.hypot(a["x"] - b["x"], a["y"] - b["y"]) <= tol)

    ok = [[same(p, t) for t in truth] for p in parsed]
    owner: list[int | None] = [None] * len(truth)  # truth index -> parsed index

    def augment(i: int, seen: set[int]) -> bool:  # Kuhn's bipartite matching
        for j in range(len(truth)):
            if ok[i][j] and j not in seen:
                seen.add(j)
                if owner[j] is None or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(augment(i, set()) for i in range(len(parsed)))


# ----------------------------------------------------------------------------- reading captions

_WORD = {"size": "|".join(SIZES), "color": "|".join(COLORS), "shape": "|".join(SHAPES)}
# "(size)? color shape", found anywhere; a trailing s lets plurals name their kind too
_MENTION = re.compile(rf"\b(?:({_WORD['size']})\s+)?({_WORD['color']})\s+({_WORD['shape']})s?\b")
_A = rf"an?\s+(?:(?:{_WORD['size']})\s+)?(?:{_WORD['color']})\s+(?:{_WORD['shape']})"
_THE = rf"the\s+(?:(?:{_WORD['size']})\s+)?(?:{_WORD['color']})\s+(?:{_WORD['shape']})"
_REL = "|".join(RELATIONS)
_NUMBER = {"one": 1, "two": 2, "three": 3}
_WHERE = {"to its left": "left of", "to its right": "right of", "above it": "above",
          "below it": "below"}
_SIDE = {"left": ("right", "left of"), "right": ("left", "right of"), "top": ("bottom", "above"),
         "bottom": ("top", "below")}  # the first side named -> (the other side, a's relation)


def _full(pattern: str) -> re.Pattern:
    return re.compile(f"^{pattern}$")


# The generator's grammar (training/data/shapes.py TEMPLATES), most specific first; a list is
# "A, B and C". Each reading returns (mention phrases in claim order, relation word, count).
_LIST = rf"((?:{_A})(?:(?:,\s*|\s+and\s+)(?:{_A}))*)"
_GRAMMAR: list[tuple[re.Pattern, Callable[[tuple], tuple]]] = [
    (_full(rf"(one|two|three) shapes:\s*{_LIST}"), lambda g: ([g[1]], None, _NUMBER[g[0]])),
    (_full(rf"an image of {_LIST}"), lambda g: ([g[0]], None, "all")),
    (_full(rf"({_A}) alone on the canvas"), lambda g: ([g[0]], None, 1)),
    (_full(rf"there is ({_A}) in the picture"), lambda g: ([g[0]], None, None)),
    (_full(rf"a picture containing ({_A})"), lambda g: ([g[0]], None, None)),
    (_full(rf"({_A}) with ({_A}) ({'|'.join(_WHERE)})"),
     lambda g: ([g[1], g[0]], _WHERE[g[2]], None)),
    (_full(rf"on the (left|right|top|bottom) is ({_A}), on the (left|right|top|bottom) ({_A})"),
     lambda g: ([g[1], g[3]], _SIDE[g[0]][1] if _SIDE[g[0]][0] == g[2] else None, None)),
    (_full(rf"({_THE}) is ({_REL}) ({_THE})"), lambda g: ([g[0], g[2]], g[1], None)),
    (_full(rf"({_A}) ({_REL}) ({_A})"), lambda g: ([g[0], g[2]], g[1], None)),
    (_full(rf"({_A}) (?:and|next to) ({_A})"), lambda g: ([g[0], g[1]], None, None)),
    (_full(rf"({_A})"), lambda g: ([g[0]], None, None)),
]


def _mentions(text: str) -> list[dict]:
    out = []
    for size, color, shape in _MENTION.findall(text):
        m = {"shape": shape, "color": color}
        if size:
            m["size"] = size
        out.append(m)
    return out


def read_caption(text: str) -> dict:
    """The claim a caption makes: {"mentions": [{"shape", "color", optional "size"}...],
    "relation": [i, rel, j] or None, "count": n or None}.

    Captions in the generator's grammar read back to the claim they were written from (a relation
    stated from the other side, "a blue square with a red circle to its left", reads as the
    claim "a red circle left of a blue square"). Other text yields the "(size) color shape"
    phrases it holds, with no relation and no count.
    """
    norm = " ".join(text.lower().split()).rstrip(".!? ")
    for pattern, reading in _GRAMMAR:
        match = pattern.match(norm)
        if match is None:
            continue
        phrases, rel, count = reading(match.groups())
        mentions = [m for p in phrases for m in _mentions(p)]
        if count == "all":
            count = len(mentions)
        relation = [0, rel, 1] if rel is not None and len(mentions) == 2 else None
        return {"mentions": mentions, "relation": relation, "count": count}
    return {"mentions": _mentions(norm), "relation": None, "count": None}


def _prf(hits_p: int, named: int, hits_r: int, present: int) -> tuple[float, float, float]:
    p = hits_p / named if named else 0.0
    r = hits_r / present if present else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def attribute_scores(captions: list[str], scenes: list[list[dict]]) -> dict[str, float]:
    """Do the captions name what their scenes hold? Micro-averaged over all captions.

    mention_*: a (color, shape) pair a caption names is right if its scene has an object of that
    color and shape (precision); recall is the share of the scenes' objects their captions name.
    word_*: the same over the sets of color and shape words a caption uses and its scene's.
    captions[i] describes scenes[i] (object dicts with shape and color). Returns
    {"mention_precision", "mention_recall", "mention_f1", "word_precision", "word_recall",
    "word_f1"}, each in [0, 1].
    """
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    vocab = set(COLORS) | set(SHAPES)
    m = [0, 0, 0, 0]  # right named, named, objects named, objects
    w = [0, 0, 0, 0]
    for text, scene in zip(captions, scenes):
        named = {(x["color"], x["shape"]) for x in read_caption(text)["mentions"]}
        held = {(o["color"], o["shape"]) for o in scene}
        m[0] += len(named & held)
        m[1] += len(named)
        m[2] += sum((o["color"], o["shape"]) in named for o in scene)
        m[3] += len(scene)
        tokens = re.findall(r"[a-z]+", text.lower())
        words = {t for t in tokens if t in vocab} | {t[:-1] for t in tokens if t[:-1] in SHAPES}
        scene_words = {o["color"] for o in scene} | {o["shape"] for o in scene}
        w[0] += len(words & scene_words)
        w[1] += len(words)
        w[2] += len(words & scene_words)
        w[3] += len(scene_words)
    out = {}
    for level, (hp, named, hr, present) in (("mention", m), ("word", w)):
        p, r, f = _prf(hp, named, hr, present)
        out.update({f"{level}_precision": p, f"{level}_recall": r, f"{level}_f1": f})
    return out


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> list[list[dict]]:
    """python -m mmdemo.oracle IMAGE [IMAGE ...]: print what each picture holds."""
    p = argparse.ArgumentParser(prog="python -m mmdemo.oracle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path, help="pictures of the shapes world")
    args = p.parse_args(argv)
    out = []
    for path in args.images:
        with Image.open(path) as img:
            objects = parse_scene(img)
        out.append(objects)
        words = "; ".join(f"{o['size']} {o['color']} {o['shape']} at ({o['x']:.1f}, {o['y']:.1f})"
                          for o in objects)
        print(f"{path}: {len(objects)} object(s){': ' + words if words else ''}")
    return out


if __name__ == "__main__":
    main()
