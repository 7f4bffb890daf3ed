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
