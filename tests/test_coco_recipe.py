"""The MS-COCO 2017 recipe end to end on a small set written here in COCO's own layout: JPEG
folders train2017/ and val2017/, annotations/captions_*2017.json and instances_*2017.json.

train (python -m training) -> evaluate under the 5k protocol (python -m training.evaluate)
-> export with the COCO val gallery (python -m export), each through its command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.data.coco import load_captions
from training.data.synthetic_coco import write_coco_split as write_coco_2017
from training.evaluate import first_captions, recall_chance

ROOT = Path(__file__).resolve().parents[1]


def test_recall_chance_and_first_captions(tmp_path):
    assert recall_chance([1, 1], ks=(1,)) == {"t2i_R@1": 0.5, "i2t_R@1": 0.5}
    ch = recall_chance([5] * 40)
    assert ch["t2i_R@5"] == pytest.approx(5 / 40) and ch["i2t_R@1"] == pytest.approx(5 / 200)
    assert ch["i2t_R@10"] == pytest.approx(1 - np.prod([(195 - j) / (200 - j) for j in range(10)]))
    caps, _, img_dir = write_coco_2017(tmp_path, "val", 6, seed=1)
    data = load_captions(caps, img_dir)
    assert [len(c) for c in data.captions] == [5, 7, 5, 5, 5, 5]
    five = first_captions(data, 5)
    assert [len(c) for c in five.captions] == [5] * 6
    assert five.captions[1] == data.captions[1][:5]  # the first five in the file's order
    assert first_captions(data, None) is data


@pytest.mark.slow
def test_coco_2017_recipe_end_to_end(tmp_path):
    from export.__main__ import main as export_main
    from training.__main__ import main as train_main
    from training.evaluate import main as evaluate_main

    coco = tmp_path / "coco"
    tc, _, timg = write_coco_2017(coco, "train", 120, seed=0)
    vc, _, vimg = write_coco_2017(coco, "val", 40, seed=1)
    run = train_main(["--train-captions", str(tc), "--train-images", str(timg),
                      "--val-captions", str(vc), "--val-images", str(vimg),
                      "--out", str(tmp_path / "runs" / "coco"), "--epochs", "12",
                      "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "5",
                      "--image-encoder", "small_cnn", "--image-size", "64", "--cnn-width", "16",
                      "--text-dim", "32", "--text-layers", "1", "--embed-dim", "32",
                      "--hard-negatives", "0", "--seed", "0", "--threads", "2"])

    # the recipe's evaluate command, as a user types it
    out = tmp_path / "coco5k.json"
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--run", str(run),
                           "--captions", str(vc), "--images", str(vimg), "--limit", "5000",
                           "--threads", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "image -> text" in proc.stdout and "text -> image" in proc.stdout
    res = json.loads(out.read_text())
    m, chance = res["metrics"], res["chance"]
    assert res["n_images"] == 40 and res["n_captions"] == 200  # 7 captions cut to the first 5
    assert res["captions_per_image"] == {"5": 40}
    val_ids = load_captions(vc, vimg).image_ids
    assert res["image_ids"] == val_ids == sorted(val_ids)
    for way in ("i2t", "t2i"):
        for k in (1, 5, 10):
            key = f"{way}_R@{k}"
            assert 0.0 <= m[key] <= 1.0 and 0.0 < chance[key] < 1.0
        assert m[f"{way}_R@1"] <= m[f"{way}_R@5"] <= m[f"{way}_R@10"]
    # learnable set: far above a random ranking (chance t2i R@5 0.125, i2t R@10 0.228). Six
    # training seeds on three drawn sets gave margins of at least 0.73 and 0.40 here.
    assert m["t2i_R@5"] >= chance["t2i_R@5"] + 0.4, m
    assert m["i2t_R@10"] >= chance["i2t_R@10"] + 0.2, m

    # --limit keeps the first images by id
    few = evaluate_main(["--run", str(run), "--captions", str(vc), "--images", str(vimg),
                         "--limit", "25"])
    assert few["image_ids"] == val_ids[:25] and few["n_captions"] == 125

    # the gallery of a COCO run is its val set; with every caption, the bundle's PyTorch
    # text -> image recall is the same computation as ours (image -> text there also counts
    # equal words as a hit, so only t2i is comparable)
    bundle = export_main([str(run), str(tmp_path / "bundles" / "coco")])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["gallery"]["count"] == 40 and manifest["gallery"]["captions"] == 202
    every = evaluate_main(["--run", str(run), "--captions", str(vc), "--images", str(vimg),
                           "--captions-per-image", "0"])
    assert every["n_captions"] == 202
    for k in (1, 5, 10):
        ours, theirs = every["metrics"][f"t2i_R@{k}"], manifest["metrics"]["torch"][f"t2i_R@{k}"]
        assert abs(ours - theirs) <= 1 / 202, (k, ours, theirs)
        bundle_r = manifest["metrics"]["bundle"][f"t2i_R@{k}"]
        assert abs(bundle_r - theirs) <= 0.005, (k, bundle_r, theirs)
