"""Fusion: the modules, the task sets (shapes questions, COCO supercategories), the metrics, and
training end to end on a small COCO-format set written here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.tasks import (
    _category_patterns,
    load_coco_tasks,
    load_shapes_tasks,
    named_category,
)
from training.evaluate import average_precision, task_metrics
from training.fusion import METHODS, FusionModel, feature_grid, fusion_loss
from training.models import SmallCNN, SmallTransformer

N_CLASSES, N_VALUES, N_KINDS = 7, 3, 4


def _model(method: str) -> FusionModel:
    torch.manual_seed(0)
    img, txt = SmallCNN(64, 8), SmallTransformer(50, 32, 1, 2, 16)
    return FusionModel(img, txt, method, feature_grid(img, 64), N_CLASSES, N_VALUES, N_KINDS,
                       dim=32, heads=2, layers=2)


def _batch(b: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 64, 64, generator=g)
    ids = torch.randint(1, 50, (b, 9), generator=g)
    mask = torch.ones(b, 9, dtype=torch.long)
    mask[0, 6:] = 0  # one padded text
    return image, ids, mask


@pytest.mark.parametrize("method", METHODS)
def test_outputs_and_every_parameter_learns(method):
    model = _model(method).train()
    image, ids, mask = _batch()
    out = model(image, ids, mask, torch.full((5,), 0.5))
    assert out["logits"].shape == (5, N_CLASSES) and out["values"].shape == (5, N_VALUES)
    assert out["kinds"].shape == (5, N_KINDS)
    assert all(torch.isfinite(v).all() for v in out.values())
    if method == "cross_attention":
        att = out["attention"]
        assert att.shape == (5, 8, 8)
        assert torch.allclose(att.sum((1, 2)), torch.ones(5), atol=1e-5)
    labels = torch.tensor([0, 3, -1, 6, -1])  # -1: asks no class
    values = torch.full((5, N_VALUES), float("nan"))
    values[2, :2] = torch.tensor([0.2, 0.7])
    terms = fusion_loss(out, labels, values, torch.tensor([0, 1, 2, 3, 2]))
    assert set(terms) == {"class", "values"} | ({"kind"} if method != "image_only" else set())
    sum(terms.values()).backward()
    # fusion reads the CNN's map (features), not its retrieval head (reduce, fc)
    used = [n for n, p in model.named_parameters()
            if not n.startswith(("image_backbone", "text_backbone"))
            or (method != "text_only" and n.startswith("image_backbone.features"))
            or (method != "image_only" and n.startswith("text_backbone"))]
    missing = [n for n, p in model.named_parameters() if n in used
               and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reaches {missing}"


def test_weighted_sum_ends_ignore_one_side():
    """a = 1 reads the image alone, a = 0 the text alone."""
    model = _model("weighted_sum").eval()
    image, ids, mask = _batch(seed=0)
    image2, ids2, _ = _batch(seed=1)
    with torch.no_grad():
        one = [model(image, i, mask, torch.ones(5)) for i in (ids, ids2)]
        zero = [model(x, ids, mask, torch.zeros(5)) for x in (image, image2)]
        mid = [model(image, i, mask, torch.full((5,), 0.5)) for i in (ids, ids2)]
    for k in ("logits", "values"):
        torch.testing.assert_close(one[0][k], one[1][k])  # the text changed, nothing else did
        torch.testing.assert_close(zero[0][k], zero[1][k])  # the image changed, ...
        assert not torch.allclose(mid[0][k], mid[1][k])  # in between, both count


def test_shared_rows_give_the_same_answers():
    """Training computes each distinct image and text once and picks rows for the items; that
    must equal running every item on its own."""
    model = _model("cross_attention").eval()
    image, ids, mask = _batch(3)
    img_idx, txt_idx = torch.tensor([0, 2, 2, 1, 0]), torch.tensor([1, 1, 0, 2, 0])
    with torch.no_grad():
        shared = model.forward_from(model.image_features(image),
                                    model.text_backbone.forward_tokens(ids, mask), mask,
                                    torch.full((5,), 0.5), img_idx, txt_idx)
        each = model(image[img_idx], ids[txt_idx], mask[txt_idx], torch.full((5,), 0.5))
    for k in each:
        torch.testing.assert_close(shared[k], each[k], atol=1e-5, rtol=1e-5)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="fusion method 'sum'"):
        FusionModel(SmallCNN(64, 8), SmallTransformer(50, 32, 1, 2, 16), "sum", (8, 8), 2, 1, 1)


def test_average_precision_known_values():
    # scikit-learn's documented example: average_precision_score -> 0.8333...
    assert average_precision(np.array([0.1, 0.4, 0.35, 0.8]),
                             np.array([0, 0, 1, 1])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0.9, 0.1]), np.array([1, 0])) == 1.0
    assert math.isnan(average_precision(np.array([0.9, 0.1]), np.array([0, 0])))


def test_shapes_tasks_hold_every_question(tiny_data):
    tasks = load_shapes_tasks(tiny_data, "val")
    labels = json.loads((tiny_data / "labels_val.json").read_text())
    assert len(tasks) == len(labels["questions"])
    assert tasks.kind_names == labels["question_kinds"]
    meta = tasks.meta()
    assert meta["answers"]["position"] == {"class": False, "values": ["x", "y"]}
    assert meta["answers"]["area"] == {"class": False, "values": ["area"]}
    assert meta["answers"]["color_of"] == {"class": True, "values": []}
    # perfect predictions score perfectly; the task metrics see through NaN targets
    logits = np.eye(len(tasks.class_names))[np.maximum(tasks.labels, 0)]
    pred = {"logits": logits, "values": np.nan_to_num(tasks.values),
            "kinds": np.eye(len(tasks.kind_names))[tasks.kinds]}
    m = task_metrics(pred, tasks)
    assert m["accuracy"] == 1.0 and m["mae_position"] == 0.0 and m["kind_accuracy"] == 1.0
    assert m["r2_area"] == pytest.approx(1.0)
    pred["values"] = pred["values"] + 0.1
    assert task_metrics(pred, tasks)["mae_x"] == pytest.approx(0.1, abs=1e-6)


# ----------------------------------------------------------------------------- COCO


CATS = [(18, "dog", "animal"), (17, "cat", "animal"), (58, "hot dog", "food"),
        (3, "car", "vehicle"), (62, "chair", "furniture")]


def write_coco_tasks(root, split: str, n: int, start: int = 1):
    """captions_<split>2017.json, instances_<split>2017.json and JPEGs, as COCO distributes
    them; the captions name categories in the singular and plural."""
    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(start)
    images, caps, insts = [], [], []
    for k in range(n):
        i = start + k
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(img_dir / name)
        images.append({"id": i, "file_name": name, "height": 48, "width": 64, "license": 1})
        n_dogs = k % 3
        objs = [18] * n_dogs + ([3] if k % 2 else [62])
        for j, c in enumerate(objs):
            insts.append({"id": i * 10 + j, "image_id": i, "category_id": c, "iscrowd": 0,
                          "bbox": [1, 1, 10, 10], "area": 100.0, "segmentation": []})
        texts = [f"{'two' if n_dogs == 2 else 'a'} dogs near a {'car' if k % 2 else 'chair'}",
                 "a photo of something", "a hot dog on a plate" if k == 0 else "a cat sleeps"]
        for j, t in enumerate(texts):
            caps.append({"id": i * 10 + j, "image_id": i, "caption": t})
    cats = [{"id": c, "name": nm, "supercategory": sc} for c, nm, sc in CATS]
    (root / f"captions_{split}2017.json").write_text(json.dumps(
        {"info": {}, "licenses": [], "images": images, "annotations": caps}))
    (root / f"instances_{split}2017.json").write_text(json.dumps(
        {"info": {}, "licenses": [], "images": images, "annotations": insts,
         "categories": cats}))
    return root / f"captions_{split}2017.json", root / f"instances_{split}2017.json", img_dir


def test_coco_supercategories_and_counts(tmp_path):
    caps, inst, img_dir = write_coco_tasks(tmp_path, "val", 4)
    tasks = load_coco_tasks(caps, inst, img_dir)
    assert tasks.multilabel and tasks.class_names == ["animal", "food", "furniture", "vehicle"]
    assert len(tasks) == 12 and tasks.value_names == ["count"]
    first = dict(zip(tasks.class_names, tasks.labels[0]))  # image 1: no dog, a chair
    assert first == {"animal": 0, "food": 0, "furniture": 1, "vehicle": 0}
    third = dict(zip(tasks.class_names, tasks.labels[tasks.item_image == 2][0]))  # 2 dogs, chair
    assert third == {"animal": 1, "food": 0, "furniture": 1, "vehicle": 0}
    counts = {t: v for t, v in zip(tasks.texts, tasks.values[:, 0])}
    assert counts["two dogs near a chair"] == 2  # the dogs, not the chair: named first
    assert counts["a hot dog on a plate"] == 0  # "hot dog", not "dog"
    assert np.isnan(counts["a photo of something"])
    assert named_category("Chairs and a car", _category_patterns(["car", "chair"])) == "chair"


@pytest.mark.slow
def test_fusion_trains_and_exports_on_coco(tmp_path):
    """The COCO recipe end to end on a few images: dual encoder, then fusion (multi-label
    supercategories + counts), then a bundle whose Engine answers with sigmoid scores."""
    from export.onnx import export_bundle
    from mmdemo import Engine
    from training.__main__ import main as train_main
    from training.train_fusion import main as fusion_main

    tc, ti, timg = write_coco_tasks(tmp_path, "train", 12, start=1)
    vc, vi, vimg = write_coco_tasks(tmp_path, "val", 6, start=100)
    run = train_main(["--train-captions", str(tc), "--train-images", str(timg),
                      "--val-captions", str(vc), "--val-images", str(vimg),
                      "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4",
                      "--cnn-width", "8", "--text-dim", "32", "--text-layers", "1",
                      "--embed-dim", "16", "--warmup-steps", "1", "--hard-negatives", "0"])
    fusion = fusion_main(["--run", str(run), "--out", str(tmp_path / "fusion"),
                          "--train-captions", str(tc), "--train-instances", str(ti),
                          "--train-images", str(timg), "--val-captions", str(vc),
                          "--val-instances", str(vi), "--val-images", str(vimg),
                          "--methods", "text_only,cross_attention", "--epochs", "2",
                          "--batch-images", "4", "--dim", "16", "--heads", "2"])
    val = json.loads((fusion / "val_metrics.json").read_text())
    assert set(val) == {"text_only", "cross_attention"}
    for m in val.values():
        assert 0.0 <= m["mAP"] <= 1.0 and 0.0 <= m["micro_f1"] <= 1.0
        assert np.isfinite(m["mae_count"])
    bundle = export_bundle(run, tmp_path / "bundle", fusion_dir=fusion)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["fusion"]["task"]["multilabel"] is True
    assert set(manifest["metrics"]["fusion"]["methods"]) == {"text_only", "cross_attention"}
    engine = Engine.load(bundle)
    ans = engine.classify(Image.open(vimg / "000000000100.jpg"), "two dogs near a car",
                          "cross_attention", k=4)
    assert set(ans.labels) == {"animal", "food", "furniture", "vehicle"}
    assert all(0.0 < p < 1.0 for p in ans.labels.values())  # sigmoids, not a softmax
    assert sum(ans.labels.values()) != pytest.approx(1.0, abs=1e-3)
    assert set(ans.values) == {"count"}


@pytest.mark.slow
def test_fine_tuning_moves_the_encoders_and_freezing_does_not(tiny_run, tiny_fusion, tmp_path):
    from safetensors.torch import load_file

    from training.train_fusion import main

    spine = load_file(tiny_run / "checkpoints" / "last" / "model.safetensors")
    out = main(["--run", str(tiny_run), "--out", str(tmp_path / "ft"), "--methods", "concat",
                "--epochs", "1", "--batch-images", "32", "--dim", "32", "--heads", "2",
                "--no-freeze-image", "--no-freeze-text"])

    def drift(fusion_dir, prefix):
        w = load_file(fusion_dir / "concat" / "checkpoints" / "last" / "model.safetensors")
        return max(float((w[k] - spine[k]).abs().max()) for k in spine
                   if k.startswith(prefix) and k in w and w[k].is_floating_point())

    for prefix in ("image_backbone.features", "text_backbone"):
        assert drift(out, prefix) > 1e-4, f"{prefix} did not move when fine-tuned"
        assert drift(tiny_fusion, prefix) == 0.0, f"{prefix} moved while frozen"


def test_fusion_cli_names_bad_options(tiny_run, tmp_path, capsys):
    from training.train_fusion import main

    with pytest.raises(SystemExit) as e:
        main(["--run", str(tiny_run), "--out", str(tmp_path), "--methods", "concat,mlp"])
    assert e.value.code == 2 and "choose from" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--run", str(tiny_run), "--out", str(tmp_path), "--train-captions", "x.json"])
    assert e.value.code == 2 and "COCO fusion needs" in capsys.readouterr().err
