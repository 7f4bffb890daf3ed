"""The shapes world: deterministic, COCO format, captions true of their scenes."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from training.data.coco import load_shapes_split
from training.data.shapes import (
    ANSWERS,
    COLORS,
    QUESTION_KINDS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    VALUES,
    Obj,
    draw_scene,
    main,
    perturb,
    relation_holds,
    satisfies,
    shape_area,
)


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "shapes_config.json"}  # it records the out path


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    args = ["--n-train", "12", "--n-val", "3", "--n-test", "3"]
    a = _tree_bytes(main(["--out", str(tmp_path / "a"), "--seed", "7", *args]))
    b = _tree_bytes(main(["--out", str(tmp_path / "b"), "--seed", "7", *args]))
    c = _tree_bytes(main(["--out", str(tmp_path / "c"), "--seed", "8", *args]))
    assert a == b
    assert a["captions_train.json"] != c["captions_train.json"]


def test_coco_format_and_vocabulary(tiny_data):
    for split, n in (("train", 256), ("val", 40), ("test", 60)):
        data = load_shapes_split(tiny_data, split)
        assert len(data) == n
        assert all(len(c) >= 5 for c in data.captions)
        assert all(1 <= len(o) <= 3 for o in data.objects)
    train = load_shapes_split(tiny_data, "train")
    objs = [o for scene in train.objects for o in scene]
    assert {o["shape"] for o in objs} == set(SHAPES) and len(SHAPES) >= 5
    assert {o["color"] for o in objs} == set(COLORS) and len(COLORS) >= 8
    assert {o["size"] for o in objs} == set(SIZES)
    used = Counter(c[2]["template"] for caps in train.captions for c in caps)
    assert len(used) >= 10 and set(used) <= set(TEMPLATES)
    rels = {c[2]["relation"][1] for caps in train.captions for c in caps if c[2]["relation"]}
    assert rels == set(RELATIONS)


def test_every_caption_is_true_of_its_own_scene(tiny_data):
    data = load_shapes_split(tiny_data, "train")
    for objs, caps in zip(data.objects, data.captions):
        for _, text, claim in caps:
            assert satisfies(objs, claim), (text, objs)
            for m in claim["mentions"]:
                assert m["color"] in text and m["shape"] in text


def test_hard_negatives_are_false_of_the_scene(tiny_data):
    data = load_shapes_split(tiny_data, "train")
    rng = random.Random(0)
    made = 0
    for objs, caps in zip(data.objects, data.captions):
        for _, text, claim in caps:
            neg = perturb(objs, claim, rng)
            if neg is not None:
                made += 1
                assert not satisfies(objs, neg) and neg["text"] != text
    assert made > 0.9 * sum(len(c) for c in data.captions)


def test_questions_have_correct_answers(tiny_data):
    labels = json.loads((tiny_data / "labels_train.json").read_text())
    data = load_shapes_split(tiny_data, "train")
    scene = dict(zip(data.image_ids, data.objects))
    assert labels["answers"] == ANSWERS
    types = Counter()
    for q in labels["questions"]:
        objs = scene[q["image_id"]]
        types[q["type"]] += 1
        if q["type"] in ("position", "area"):  # answered by numbers, not by a class
            assert q["answer"] is None and q["answer_id"] == -1
            color, shape = q["question"].rstrip("?").split()[-3 if q["type"] == "area" else -2:][:2]
            o = next(o for o in objs if (o["color"], o["shape"]) == (color, shape))
            if q["type"] == "position":
                assert q["values"] == {"x": round(o["x"] / 64, 4), "y": round(o["y"] / 64, 4)}
            else:
                assert q["values"]["area"] == pytest.approx(
                    shape_area(shape, o["size"]) / 64**2, abs=1e-5)
            continue
        assert ANSWERS[q["answer_id"]] == q["answer"]
        if q["type"] == "count_color":
            color = q["question"].split()[2]
            assert q["answer"] == str(sum(o["color"] == color for o in objs))
        if q["type"] == "exists_shape":
            shape = q["question"].rstrip("?").split()[-1]
            assert q["answer"] == ("yes" if any(o["shape"] == shape for o in objs) else "no")
    assert set(types) == set(QUESTION_KINDS)
    assert labels["values"] == VALUES and labels["question_kinds"] == QUESTION_KINDS


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_area_matches_the_drawn_pixels(shape):
    """The area answer is the area the drawing covers (counted on a 64x64 render)."""
    objs = [Obj(shape, "white", "large", 32.0, 32.0)]
    img = np.asarray(draw_scene(objs, random.Random(1)), dtype=np.float32)
    covered = (img.min(2) > 160).sum()  # white object on a dark background
    assert covered == pytest.approx(shape_area(shape, "large"), rel=0.12)


def test_oracle_relations_and_counts():
    a = {"shape": "circle", "color": "red", "size": "small", "x": 10, "y": 30}
    b = {"shape": "square", "color": "blue", "size": "large", "x": 50, "y": 32}
    assert relation_holds("left of", a, b) and not relation_holds("right of", a, b)
    assert not relation_holds("above", a, b)  # 2 px apart vertically is no relation
    left = {"mentions": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}],
            "relation": [0, "left of", 1], "count": None}
    assert satisfies([a, b], left)
    assert not satisfies([a, b], {**left, "relation": [0, "right of", 1]})
    assert not satisfies([a, b], {**left, "count": 3})
    swapped = {**left, "mentions": [{"shape": "circle", "color": "blue"},
                                     {"shape": "square", "color": "red"}]}
    assert not satisfies([a, b], swapped)


@pytest.mark.parametrize("argv, msg", [(["--n-train", "0"], "--n-train must be at least 1"),
                                       (["--size", "8"], "--size must be at least 32")])
def test_cli_rejects_bad_values(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err
