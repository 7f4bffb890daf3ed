"""The app end to end: app.py served on 127.0.0.1 with torch unimportable, every api_name called
through gradio_client. The page in a real browser is tests/test_browser.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, copy_bundle, serve_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """app.py on a copy of the tiny bundle; yields (url, log)."""
    folder = tmp_path_factory.mktemp("app")
    bundle = copy_bundle(tiny_bundle, folder / "bundle")
    with serve_app(bundle, folder) as (url, log, _):
        yield url, log


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def test_serves_on_cpu_without_torch(server):
    text = server[1].read_text()
    assert "serving" in text and "ExecutionProvider" in text
    assert "Traceback" not in text


def _labels(gallery) -> list[str]:
    return [item["caption"] for item in gallery]


def test_search_by_text(client):
    gallery = client.predict("a red circle", 5, api_name="/search_by_text")
    assert len(gallery) == 5
    assert all(Path(item["image"]).is_file() for item in gallery)
    scores = [float(item["caption"].split(" · ")[0]) for item in gallery]
    assert scores == sorted(scores, reverse=True)


def test_image_endpoints(client):
    from gradio_client import handle_file

    example = handle_file(str(ROOT / "examples" / "scene_1.png"))
    gallery = client.predict(example, 4, api_name="/search_by_image")
    assert len(gallery) == 4 and len(set(_labels(gallery))) == 4
    table = client.predict(example, 6, api_name="/search_captions")
    rows = table["data"]
    assert len(rows) == 6 and [r[0] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(r[2], str) and r[2] for r in rows)
    g1 = client.predict(example, "a yellow star", 1.0, 4, api_name="/search_composed")
    assert _labels(g1) == _labels(gallery)  # a = 1 is the image query alone
    g0 = client.predict(example, "a yellow star", 0.0, 4, api_name="/search_composed")
    g_text = client.predict("a yellow star", 4, api_name="/search_by_text")
    assert _labels(g0) == _labels(g_text)  # a = 0 is the text query alone
    assert _labels(g0) != _labels(g1)


def test_classify(client, tiny_bundle):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from training.data.shapes import ANSWERS, QUESTION_KINDS

    example = handle_file(str(ROOT / "examples" / "scene_3.png"))
    fused, image_only, text_only, overlay, note = client.predict(
        example, "what color is the square?", "cross_attention", 0.5, api_name="/classify")
    kind = next(k for k in QUESTION_KINDS if f"asks for:** {k}" in note)
    if kind in ("position", "area"):  # a numeric answer comes as words
        assert "x " in fused["label"] or "area " in fused["label"]
    else:
        assert fused["label"] in ANSWERS and len(fused["confidences"]) == 5
        assert image_only["label"] in ANSWERS and text_only["label"] in ANSWERS
    assert Path(overlay).is_file() and "cross-attention" in note
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    ex = manifest["fusion"]["examples"][4]  # a position question from the test split
    assert ex["kind"] == "position"
    img = handle_file(str(tiny_bundle / "gallery" / f"{ex['image_id']}.png"))
    fused, *_ = client.predict(img, ex["text"], "weighted_sum", 0.3, api_name="/classify")
    assert fused["label"]
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, "is there a star?", "concat", 0.5, api_name="/classify")
    with pytest.raises(AppError, match="Type a description first"):
        client.predict(example, "  ", "concat", 0.5, api_name="/classify")


def test_about_shows_manifest_and_provider(client):
    md, curves = client.predict(api_name="/about")
    assert "Execution provider" in md and "CPUExecutionProvider" in md
    assert "t2i_R@10" in md and Path(curves).is_file()
    assert "Fused classification on the test split" in md and "cross-attention |" in md


def test_bad_input_gets_a_clear_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Type a description first"):
        client.predict("   ", 5, api_name="/search_by_text")
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, 5, api_name="/search_captions")
    from gradio_client import handle_file

    example = handle_file(str(ROOT / "examples" / "scene_2.png"))
    with pytest.raises(AppError, match="greater than maximum"):  # Gradio checks the slider
        client.predict(example, "a red circle", 1.5, 4, api_name="/search_composed")
    # a long text is read up to the model's length, with a warning (tests/test_reliability.py)
    assert len(client.predict("a red circle " * 60, 5, api_name="/search_by_text")) == 5


def test_cli_names_a_missing_or_damaged_bundle(tmp_path, tiny_bundle):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--bundle",
                          str(tmp_path / "nowhere")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "no bundle at" in out.stderr
    assert "Traceback" not in out.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, damaged)
    (damaged / "text_encoder.onnx").write_bytes(b"not a graph")
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--bundle", str(damaged)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "text_encoder.onnx has sha256" in out.stderr
    assert "Traceback" not in out.stderr


def test_caption(client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    example = handle_file(str(ROOT / "examples" / "scene_1.png"))
    text, note, near = client.predict(example, "beam", 3, 1.0, 0.9, 32, 0, api_name="/caption")
    assert text and "beam search, width 3" in note
    assert len(near["data"]) == 2 and all(r[2] for r in near["data"])
    a = client.predict(example, "nucleus", 3, 1.5, 0.95, 32, 11, api_name="/caption")
    b = client.predict(example, "nucleus", 3, 1.5, 0.95, 32, 11, api_name="/caption")
    assert a[0] == b[0] and "seed 11" in a[1]
    short, note, _ = client.predict(example, "greedy", 3, 1.0, 0.9, 4, 0, api_name="/caption")
    assert "greedy" in note and int(note.split(" tokens")[0].split("· ")[-1]) <= 4
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, "beam", 3, 1.0, 0.9, 32, 0, api_name="/caption")


def test_generate_image(client):
    from gradio_client.exceptions import AppError

    drawn, nearest, table, note, seed = client.predict(
        "a large red circle", 3, 5, False, 1.0, api_name="/generate_image")
    assert seed == 5 and len(drawn) == 3 and len(nearest) == 3
    assert [r[0] for r in table["data"]] == [5, 6, 7]  # sample i draws with seed + i
    assert all(Path(d["image"]).is_file() for d in drawn)
    assert "samples satisfy the prompt" in note
    again = client.predict("a large red circle", 1, 6, False, 1.0, api_name="/generate_image")
    assert Path(again[0][0]["image"]).read_bytes() == Path(drawn[1]["image"]).read_bytes()
    *_, other = client.predict("a large red circle", 1, 5, True, 1.0,
                               api_name="/generate_image")
    assert other != 5  # randomized (a 1 in 2**31 chance of the same seed)
    with pytest.raises(AppError, match="Type a description first"):
        client.predict(" ", 2, 0, False, 1.0, api_name="/generate_image")
