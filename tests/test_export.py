"""Export: ONNX graphs that match PyTorch on new shapes, a complete manifest, indexes that
agree with exact search, and an Engine that serves the bundle."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from mmdemo import BundleError, Engine, read_manifest
from mmdemo.text import TextTokenizer
from training.data.coco import load_shapes_split
from training.data.transforms import load_images
from training.train import embed_images, embed_texts, load_run


def test_manifest_lists_everything(tiny_bundle):
    m = read_manifest(tiny_bundle)  # also checks every sha256
    for f in ("image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "gallery.json",
              "index_images.bin", "index_captions.bin", "curves.png"):
        assert f in m["files"], f
    assert m["format_version"] == 1 and m["packages"]["torch"].startswith("2.")
    ti = m["models"]["text_encoder"]["inputs"]
    assert [i["name"] for i in ti] == ["input_ids", "attention_mask"]
    assert ti[0]["dtype"] == "int64" and ti[0]["shape"] == ["batch", "length"]
    assert m["models"]["image_encoder"]["inputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert m["preprocess"]["size"] == 64 and m["tokenizer"]["pad_token"] == "[PAD]"
    par = m["metrics"]["parity"]
    assert par["image_encoder"]["max_abs_diff"] <= 1e-4
    assert par["text_encoder"]["min_cosine"] >= 0.9999
    b, t = m["metrics"]["bundle"], m["metrics"]["torch"]
    for k in t:
        if "R@" in k:
            assert abs(b[k] - t[k]) <= 0.005, k
    assert m["gallery"]["count"] == 60 and m["indexes"]["captions"]["count"] == 300


def test_onnx_matches_pytorch_on_new_batch_sizes_and_lengths(tiny_run, tiny_data, tiny_bundle):
    onnx.checker.check_model(onnx.load(str(tiny_bundle / "text_encoder.onnx")), full_check=True)
    model, meta = load_run(tiny_run)
    engine = Engine.load(tiny_bundle)
    data = load_shapes_split(tiny_data, "test", limit=7)
    paths = data.paths()
    from PIL import Image

    pils = [Image.open(p).convert("RGB") for p in paths]
    ref = embed_images(model, load_images(paths, engine.spec))
    got = engine.encode_images(pils)
    assert np.abs(ref - got).max() <= 1e-4, np.abs(ref - got).max()
    tok = TextTokenizer.from_file(tiny_bundle / "tokenizer.json")
    texts = ["a red circle",
             "on the left is a small gray hexagon, on the right a large purple star "
             "above a green square and a white triangle"]
    ref_t = embed_texts(model, tok, texts)
    got_t = engine.encode_texts(texts)
    diff = np.abs(ref_t - got_t).max()
    assert diff <= 1e-4, f"max abs diff {diff}"


def test_engine_answers_every_query(tiny_bundle, tiny_data):
    engine = Engine.load(tiny_bundle)
    assert engine.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    hits = engine.search_by_text("a red circle", k=5)
    assert len(hits) == 5 and all(h.id in engine.gallery for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    img = engine.gallery_image(hits[0].id)
    same = engine.search_by_image(img, k=3)
    assert same[0].id == hits[0].id and same[0].score == pytest.approx(1.0, abs=1e-4)
    caps = engine.search_captions(img, k=4)
    assert len(caps) == 4 and all(c.image_id in engine.gallery for c in caps)
    only_img = engine.search_composed(img, "a blue star", alpha=1.0, k=1)
    assert only_img[0].id == hits[0].id
    only_txt = engine.search_composed(img, "a blue star", alpha=0.0, k=3)
    assert [h.id for h in only_txt] == [h.id for h in engine.search_by_text("a blue star", 3)]
    with pytest.raises(ValueError, match="empty text"):
        engine.search_by_text("   ")
    with pytest.raises(ValueError, match="alpha"):
        engine.search_composed(img, "x", alpha=1.5)


def test_tampered_bundle_is_refused(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    with open(copy / "index_images.bin", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="index_images.bin"):
        Engine.load(copy)
    assert m["files"]["index_images.bin"]


def test_export_cli_reports_a_missing_run(tmp_path, capsys):
    from export.__main__ import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "no-run"), str(tmp_path / "b")])
    assert e.value.code == 2 and "has no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()



def test_serving_never_imports_torch(tiny_bundle, no_torch):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from mmdemo import Engine\n"
        f"e = Engine.load({str(tiny_bundle)!r})\n"
        "hits = e.search_by_text('a red circle', 3)\n"
        "caps = e.search_captions(e.gallery_image(hits[0].id), 2)\n"
        "assert len(hits) == 3 and len(caps) == 2\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok', e.provider)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=no_torch, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


# ----------------------------------------------------------------------------- fusion


def test_fusion_models_are_listed_with_their_labels(tiny_bundle):
    from export.fusion import graph_inputs, graph_outputs
    from training.data.shapes import ANSWERS, QUESTION_KINDS, VALUES
    from training.fusion import METHODS

    m = read_manifest(tiny_bundle)
    assert m["fusion"]["methods"] == METHODS
    assert m["fusion"]["default"] in ("weighted_sum", "concat", "cross_attention")
    task = m["fusion"]["task"]
    assert task["classes"] == ANSWERS and task["values"] == VALUES
    assert task["kinds"] == QUESTION_KINDS and task["multilabel"] is False
    for method in METHODS:
        spec = m["models"][f"fusion_{method}"]
        assert [i["name"] for i in spec["inputs"]] == graph_inputs(method)
        assert [o["name"] for o in spec["outputs"]] == graph_outputs(method)
        assert spec["file"] in m["files"]
        got = m["metrics"]["fusion"]["methods"][method]
        assert got["parity_max_rel_diff"] <= 1e-4
        assert 0.0 <= got["accuracy"] <= 1.0 and "acc_shape_rel" in got and "mae_x" in got
    assert set(m["metrics"]["fusion"]["weighted_sum_a"]) == {"0.0", "0.5", "1.0"}
    kinds = {e["kind"] for e in m["fusion"]["examples"]}
    assert kinds == set(QUESTION_KINDS)  # examples of every kind, with true answers
    assert all("answer" in e or "values" in e for e in m["fusion"]["examples"])


def test_engine_classify_matches_pytorch(tiny_bundle, tiny_fusion, tiny_data):
    """The served answer (numpy preprocessing, ONNX Runtime) equals the trained model's
    (torchvision preprocessing, PyTorch), for every method, on questions of every kind."""
    import torch
    from PIL import Image

    from training.data.tasks import load_shapes_tasks
    from training.fusion import METHODS
    from training.train_fusion import load_fusion

    engine = Engine.load(tiny_bundle)
    tasks = load_shapes_tasks(tiny_data, "test")
    rows = [int(np.flatnonzero(tasks.kinds == k)[0]) for k in range(len(tasks.kind_names))]
    paths = [tasks.paths()[tasks.item_image[r]] for r in rows]
    tok = engine.tokenizer
    for method in METHODS:
        model, meta = load_fusion(tiny_fusion / method)
        images = load_images(paths, engine.spec)
        ids, mask = tok([tasks.texts[r] for r in rows])
        with torch.no_grad():
            ref = model(images, torch.from_numpy(ids), torch.from_numpy(mask),
                        torch.full((len(rows),), 0.25))
        for j, r in enumerate(rows):
            with Image.open(paths[j]) as im:
                ans = engine.classify(im, tasks.texts[r], method, a=0.25,
                                      k=len(tasks.class_names))
            probs = torch.softmax(ref["logits"][j].double(), 0).numpy()
            got = np.array([ans.labels[c] for c in tasks.class_names])
            assert np.abs(got - probs).max() < 1e-4, (method, np.abs(got - probs).max())
            assert np.allclose([ans.values[v] for v in tasks.value_names],
                               ref["values"][j].numpy(), atol=1e-4)
            if method == "cross_attention":
                assert np.allclose(ans.attention, ref["attention"][j].numpy(), atol=1e-5)
                assert ans.attention.sum() == pytest.approx(1.0, abs=1e-4)
            if method != "image_only":
                assert ans.kind == tasks.kind_names[int(ref["kinds"][j].argmax())]
            else:
                assert ans.kind is None  # it reads no text, so it cannot tell what is asked


def test_classify_weighted_sum_ends_and_bad_input(tiny_bundle, tiny_data):
    from PIL import Image

    engine = Engine.load(tiny_bundle)
    paths = sorted((tiny_data / "images" / "test").glob("*.png"))[:2]
    a_img, b_img = (Image.open(p).convert("RGB") for p in paths)
    one = [engine.classify(a_img, q, "weighted_sum", a=1.0).labels
           for q in ("what color is the square?", "is there a star?")]
    assert one[0] == one[1]  # a = 1: the text does not count
    zero = [engine.classify(im, "what color is the square?", "weighted_sum", a=0.0).labels
            for im in (a_img, b_img)]
    assert zero[0] == zero[1]  # a = 0: the image does not count
    with pytest.raises(ValueError, match="fusion method 'best'"):
        engine.classify(a_img, "is there a star?", "best")
    with pytest.raises(ValueError, match=r"a is 1.5; expected a weight in \[0, 1\]"):
        engine.classify(a_img, "is there a star?", "weighted_sum", a=1.5)
    with pytest.raises(ValueError, match="empty question"):
        engine.classify(a_img, "   ", "concat")
    with pytest.raises(ValueError, match="k is 0"):
        engine.classify(a_img, "is there a star?", k=0)
    engine.manifest = {k: v for k, v in engine.manifest.items() if k != "fusion"}
    with pytest.raises(ValueError, match="this bundle has no fusion models"):
        engine.classify(a_img, "is there a star?")
