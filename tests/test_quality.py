"""Quality of the default bundle on the shapes world's test split, with fixed seeds.

The default bundle is built exactly as `python app.py` builds it. Its manifest's figures are
checked against the thresholds, and recomputed here through the Engine (ONNX Runtime + hnswlib)
so that a manifest cannot claim what the served model does not do.
"""

from __future__ import annotations

import numpy as np
import pytest

from mmdemo import Engine, read_manifest
from training.data.coco import load_shapes_split
from training.evaluate import binding_accuracy, binding_pairs, evaluate_all

pytestmark = pytest.mark.slow

THRESHOLDS = {"t2i_R@10": 0.50, "i2t_R@10": 0.70, "semantic_P@10": 0.90, "binding_acc": 0.85}


@pytest.fixture(scope="module")
def served(default_bundle):
    return Engine.load(default_bundle), read_manifest(default_bundle)


def test_manifest_metrics_meet_the_thresholds(served):
    _, m = served
    got = m["metrics"]["bundle"]
    for key, floor in THRESHOLDS.items():
        assert got[key] >= floor, f"{key} = {got[key]:.3f} < {floor}"
    for k in (1, 5):  # reported beside @10, and ordered
        assert got[f"t2i_R@{k}"] <= got["t2i_R@10"] and got[f"i2t_R@{k}"] <= got["i2t_R@10"]


def test_engine_reproduces_the_manifest(served):
    engine, m = served
    test = load_shapes_split(m["train_config"]["data"], "test")
    images = [engine.gallery_image(i) for i in test.image_ids]
    metrics = evaluate_all(test, lambda rows: engine.encode_images([images[r] for r in rows]),
                           engine.encode_texts)
    for key in ("t2i_R@10", "i2t_R@10", "semantic_P@10", "binding_acc"):
        assert metrics[key] == pytest.approx(m["metrics"]["bundle"][key], abs=0.005), key


def test_binding_beats_chance_by_far(served):
    engine, m = served
    test = load_shapes_split(m["train_config"]["data"], "test")
    rows, true, swapped = binding_pairs(test.objects)
    assert len(rows) >= 100
    img = engine.encode_images([engine.gallery_image(test.image_ids[r]) for r in rows])
    acc = binding_accuracy(img, engine.encode_texts(true), engine.encode_texts(swapped))
    assert acc >= THRESHOLDS["binding_acc"], acc
    # the swapped caption really is a different query: its embedding moved
    diff = np.abs(engine.encode_texts(true[:5]) - engine.encode_texts(swapped[:5])).max()
    assert diff > 1e-3


# ----------------------------------------------------------------------------- fusion

FUSION_FLOORS = {"best_accuracy": 0.90, "over_single": 0.25, "mae_position": 0.05}


def test_fusion_ablation_meets_the_targets(served):
    _, m = served
    f = m["metrics"]["fusion"]
    methods, best = f["methods"], f["best"]
    assert best in ("weighted_sum", "concat", "cross_attention")
    acc = methods[best]["accuracy"]
    single = max(methods["image_only"]["accuracy"], methods["text_only"]["accuracy"])
    assert acc >= FUSION_FLOORS["best_accuracy"], f"{best} accuracy {acc:.3f}"
    assert acc - single >= FUSION_FLOORS["over_single"], f"{acc:.3f} vs single {single:.3f}"
    assert methods[best]["mae_position"] <= FUSION_FLOORS["mae_position"]
    # weighted sum: the ends behave like the single modalities, the middle beats both ends
    sweep = f["weighted_sum_a"]
    assert sweep["0.0"]["accuracy"] <= methods["text_only"]["accuracy"] + 0.05
    assert sweep["1.0"]["accuracy"] <= methods["image_only"]["accuracy"] + 0.05
    assert sweep["0.5"]["accuracy"] > max(sweep["0.0"]["accuracy"], sweep["1.0"]["accuracy"])


def test_engine_reproduces_the_fusion_ablation(served):
    """Every test question through Engine.classify (numpy preprocessing, ONNX Runtime) gives
    the manifest's accuracy and position error for the bundle's default method."""
    from training.data.tasks import load_shapes_tasks

    engine, m = served
    method = engine.fusion["default"]
    tasks = load_shapes_tasks(m["train_config"]["data"], "test")
    images = {i: engine.gallery_image(i) for i in tasks.image_ids}
    right, n, err = 0, 0, []
    jx, jy = tasks.value_names.index("x"), tasks.value_names.index("y")
    for r, text in enumerate(tasks.texts):
        ans = engine.classify(images[tasks.image_ids[tasks.item_image[r]]], text, method, k=1)
        if tasks.labels[r] >= 0:
            n += 1
            right += next(iter(ans.labels)) == tasks.class_names[tasks.labels[r]]
        elif np.isfinite(tasks.values[r, jx]):
            err += [abs(ans.values["x"] - tasks.values[r, jx]),
                    abs(ans.values["y"] - tasks.values[r, jy])]
    want = m["metrics"]["fusion"]["methods"][method]
    assert right / n == pytest.approx(want["accuracy"], abs=0.002)
    assert float(np.mean(err)) == pytest.approx(want["mae_position"], abs=0.002)


CAPTION_FLOORS = {"mention_f1": 0.90, "BLEU-4": 0.40, "CIDEr-D": 2.0}


def test_captions_meet_the_targets(served):
    """Beam-search captions of the test split name what the oracle sees in each image."""
    _, m = served
    c = m["metrics"]["captioning"]
    for key, floor in CAPTION_FLOORS.items():
        assert c["beam3"][key] >= floor, f"beam3 {key} = {c['beam3'][key]:.3f} < {floor}"
    assert c["parity_max_abs_diff"] < 1e-4


def test_engine_captions_score_as_the_manifest_says(served):
    """Engine.caption (numpy preprocessing, ORT, beam search in numpy) on 150 test images,
    graded by the oracle's reading of each image."""
    from mmdemo.oracle import attribute_scores, parse_scene

    engine, m = served
    ids = sorted(engine.gallery)[:150]
    images = [np.asarray(engine.gallery_image(i)) for i in ids]
    texts = [engine.caption(im, "beam", width=3).text for im in images]
    got = attribute_scores(texts, [parse_scene(im) for im in images])
    assert got["mention_f1"] >= CAPTION_FLOORS["mention_f1"], got
    assert got["mention_f1"] == pytest.approx(
        m["metrics"]["captioning"]["beam3"]["mention_f1"], abs=0.05)


# The targets for the generator. The default reaches 0.99 / 0.74 / 0.84 (seed 0) and
# 0.99 / 0.78 / 0.82 (seed 1); a generator that ignores its prompt meets about 1 in 40
# one-object prompts, and R-precision by chance is 0.01.
GENERATOR_FLOORS = {"satisfied_single": 0.80, "satisfied_two": 0.50, "r_precision": 0.70}


def test_generator_meets_the_targets(served):
    _, m = served
    g = m["metrics"]["generator"]
    for key, floor in GENERATOR_FLOORS.items():
        assert g[key] >= floor, f"{key} = {g[key]:.3f} < {floor}"
    # Drawn images may match their prompts about as well as the real ones do, not far better
    # (that would mean the generator games the encoders): two fresh builds of the same code
    # gave 0.844 against 0.851 and 0.856 against 0.831, so "never above" was not an invariant.
    assert g["r_precision"] <= g["r_precision_real_images"] + 0.05, g
    assert g["parity"]["max_abs_diff"] < 1e-4


def test_engine_draws_what_the_prompts_ask(served):
    """Engine.generate_image on 80 one-object and 80 two-object prompts of the test split, one
    sample each, graded by the oracle; the same seed draws the same picture again."""
    from mmdemo.oracle import read_caption

    engine, m = served
    for mentions, key in ((1, "satisfied_single"), (2, "satisfied_two")):
        prompts = sorted({c for it in engine.gallery.values() for c in it["captions"]
                          if len(read_caption(c)["mentions"]) == mentions})[:80]
        hits = [engine.generate_image(p, 1, seed=i)[0] for i, p in enumerate(prompts)]
        rate = float(np.mean([h.satisfies for h in hits]))
        assert rate >= GENERATOR_FLOORS[key], (mentions, rate)
    again = engine.generate_image(prompts[0], 1, seed=0)[0]
    assert np.array_equal(again.image, hits[0].image)
