"""Bad input, files, sharing: every endpoint meets odd images and texts through gradio_client and
through the Engine, gets a message that says what was wrong (never a stack trace), and keeps
serving; the server hands out no file it should not; a login stands in front when asked."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdemo import Engine
from mmdemo.preprocess import ImageError, open_image
from tests.conftest import ROOT, copy_bundle, serve_app
from tests.report import record

pytestmark = pytest.mark.slow
OK = "ok"  # the request is answered (perhaps with a warning)


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _scene(bundle: Path) -> tuple[int, Image.Image]:
    """A gallery image, upright, at thumbnail size."""
    gal = json.loads((bundle / "gallery.json").read_text())["items"][3]
    return gal["id"], Image.open(bundle / gal["file"]).convert("RGB")


def bad_images(folder: Path, bundle: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what must happen): OK, or a regex the error message must match."""
    folder.mkdir(parents=True, exist_ok=True)
    _, scene = _scene(bundle)
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = scene.transpose(Image.Transpose.ROTATE_90).getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": undoes the counter-clockwise turn below
    png = _bytes(scene, "PNG")
    cases = {
        "corrupt.png": (png[:16] + bytes(range(256)) * 4, "could not be read|damaged|not an image"),
        "truncated.png": (png[: len(png) // 2], "damaged or truncated"),
        "empty.png": (b"", "empty \\(0 bytes\\)"),
        "text.jpg": (b"this is a text file, not a photo\n" * 20, "not an image file"),
        "bomb.png": (_bytes(Image.new("1", (20000, 20000)), "PNG"), "megapixels"),
        "1x1.png": (_bytes(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), OK),
        "gray.png": (_bytes(scene.convert("L"), "PNG"), OK),
        "rgba.png": (_bytes(scene.convert("RGBA"), "PNG"), OK),
        "cmyk.jpg": (_bytes(scene.convert("CMYK"), "JPEG", quality=95), OK),
        "16bit.png": (_bytes(Image.fromarray(np.asarray(scene.convert("L"), np.uint16) * 257),
                             "PNG"), OK),
        "palette.png": (_bytes(scene.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), OK),
        "animated.gif": (gif.getvalue(), OK),
        "exif_rotated.jpg": (_bytes(scene.transpose(Image.Transpose.ROTATE_90), "JPEG",
                                    quality=95, exif=exif), OK),
    }
    out = {}
    for name, (data, expect) in cases.items():
        (folder / name).write_bytes(data)
        out[name] = (folder / name, expect)
    return out


LONG = "a red circle left of a blue square " * 2900  # 101,500 characters
TEXTS = {  # name -> (text, OK-with-this-warning or an error regex prefixed "error:")
    "empty": ("", "error:Type a description"),
    "whitespace": (" \n\t  ", "error:Type a description"),
    "control only": ("\x00\x01\x1b", "error:empty once control characters are removed"),
    "100k characters": (LONG, "only the first 2,000"),
    "emoji": ("a red circle 🔴🙂", "no token for"),
    "CJK": ("红色的圆 a red circle", "no token for"),
    "right-to-left": ("עיגול אדום a red circle", "no token for"),
    "control and NUL": ("a red\x00 circle\x07\x1b", "control character"),
}


def call(client, *args, api_name: str) -> tuple[object, str | None, list[str]]:
    """(result, error message or None, warnings) of one request."""
    from gradio_client.exceptions import AppError

    job = client.submit(*args, api_name=api_name)
    result, error = None, None
    try:
        result = job.result(timeout=60)
    except AppError as e:
        error = str(e)
    warnings = []
    updates = job.communicator.updates
    while not updates.empty():
        u = updates.get_nowait()
        if getattr(u, "log", None):
            warnings.append(u.log[0])
    return result, error, warnings


@pytest.fixture(scope="module")
def app(tiny_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability")
    bundle = copy_bundle(tiny_bundle, folder / "bundle")
    with serve_app(bundle, folder) as (url, log, proc):
        from gradio_client import Client

        yield Client(url, verbose=False), url, log, bundle


def _valid(client) -> None:
    gallery = client.predict("a red circle", 3, api_name="/search_by_text")
    assert len(gallery) == 3


def test_bad_input_through_gradio(app, tmp_path):
    from gradio_client import handle_file

    client, _, log, bundle = app
    images = bad_images(tmp_path / "img", bundle)
    scene_id, scene = _scene(bundle)
    _valid(client)
    image_calls = {
        "search_by_image": lambda f: (handle_file(f), 5),
        "search_captions": lambda f: (handle_file(f), 5),
        "search_composed": lambda f: (handle_file(f), "a red circle", 0.5, 5),
        "classify": lambda f: (handle_file(f), "what color is the square?", "concat", 0.5),
    }
    rows = []
    for name, (path, expect) in images.items():
        for api, args in image_calls.items():
            result, error, _ = call(client, *args(str(path)), api_name=f"/{api}")
            rows.append({"endpoint": api, "input": name, "error": error})
            if expect == OK:
                assert error is None, (api, name, error)
            else:
                assert error is not None and re.search(expect, error), \
                    (api, name, error)
                assert "Traceback" not in error and "File \"" not in error
        _valid(client)  # and the app keeps serving
    # the EXIF-rotated photo is turned upright: it finds its own scene first
    top = client.predict(handle_file(str(images["exif_rotated.jpg"][0])), 1,
                         api_name="/search_by_image")
    assert top[0]["caption"] == client.predict(
        handle_file(str(bundle / "gallery" / f"{scene_id}.png")), 1,
        api_name="/search_by_image")[0]["caption"]

    text_calls = {
        "search_by_text": lambda t: (t, 5),
        "search_composed": lambda t: (handle_file(str(ROOT / "examples" / "scene_1.png")), t,
                                      0.5, 5),
        "classify": lambda t: (handle_file(str(ROOT / "examples" / "scene_1.png")), t,
                               "cross_attention", 0.5),
    }
    for name, (text, expect) in TEXTS.items():
        for api, args in text_calls.items():
            result, error, warnings = call(client, *args(text), api_name=f"/{api}")
            rows.append({"endpoint": api, "input": f"text: {name}", "error": error,
                         "warnings": warnings})
            if expect.startswith("error:"):
                assert error and re.search(expect[6:], error), (api, name, error)
            else:
                assert error is None, (api, name, error)
                assert any(expect in w for w in warnings), (api, name, warnings)
    numbers = [("search_by_text", ("a red circle", 0), "less than minimum"),
               ("search_by_text", ("a red circle", 1_000_000), "greater than maximum"),
               ("search_composed", (handle_file(str(ROOT / "examples" / "scene_1.png")),
                                    "a red circle", -0.5, 5), "less than minimum"),
               ("search_composed", (handle_file(str(ROOT / "examples" / "scene_1.png")),
                                    "a red circle", 1.5, 5), "greater than maximum"),
               ("classify", (handle_file(str(ROOT / "examples" / "scene_1.png")),
                             "is there a star?", "weighted_sum", 2.0), "greater than maximum"),
               ("classify", (handle_file(str(ROOT / "examples" / "scene_1.png")),
                             "is there a star?", "no_such_method", 0.5), "not in the list|choices"),
               ("search_by_image", (None, 5), "Upload an image first")]
    for api, args, expect in numbers:
        _, error, _ = call(client, *args, api_name=f"/{api}")
        rows.append({"endpoint": api, "input": repr(args[1:])[:60], "error": error})
        assert error and re.search(expect, error), (api, args, error)
    # adding them to the gallery: the readable ones go in, each unreadable one is named with why
    added, note = client.predict([handle_file(str(p)) for p, _ in images.values()],
                                 api_name="/add_images")
    readable = [n for n, (_, expect) in images.items() if expect == OK]
    # some are the same pixels as another (the 16-bit PNG is the gray one, 257 times over):
    # those are reported with the id that holds them
    same = [n for n in readable if re.search(rf"{re.escape(n)}`: is already in the gallery "
                                             r"as id \d+", note)]
    assert len(added) == len(readable) - len(same) and f"Added {len(added)} image(s)" in note
    assert "16bit.png" in same, note
    for name, (_, expect) in images.items():
        rows.append({"endpoint": "add_images", "input": name,
                     "error": None if expect == OK else note})
        if expect != OK:
            line = next(x for x in note.splitlines() if name in x)
            assert re.search(expect, line), (name, line)
    for ids, expect in (("abc", "'abc' is not a gallery id"), ("", "Type the ids"),
                        ("99999999", "no gallery item with id 99999999")):
        _, error, _ = call(client, ids, api_name="/remove_images")
        rows.append({"endpoint": "remove_images", "input": repr(ids), "error": error})
        assert error and expect in error, (ids, error)
    _valid(client)
    assert "Traceback" not in "".join(r["error"] or "" for r in rows)
    record("bad_input_gradio", {
        "requests": len(rows), "refused_with_message": sum(r["error"] is not None for r in rows),
        "answered": sum(r["error"] is None for r in rows),
        "answered_with_warning": sum(bool(r.get("warnings")) for r in rows),
        "server_still_serving": True, "cases": rows})


def test_bad_input_through_the_engine(tiny_bundle, tmp_path):
    e = Engine.load(tiny_bundle)
    images = bad_images(tmp_path, tiny_bundle)
    rows = []
    for name, (path, expect) in images.items():
        for fn in (lambda p: e.search_by_image(p, 3), lambda p: e.search_captions(p, 3),
                   lambda p: e.classify(p, "is there a star?", "concat")):
            try:
                fn(path)
                error = None
            except ValueError as err:
                error = str(err)
            rows.append({"input": name, "error": error})
            assert (error is None) == (expect == OK), (name, error)
            if error:
                assert re.search(expect, error) and name in error
    # rotated correctly: the EXIF photo reads back as the upright scene
    _, scene = _scene(tiny_bundle)
    upright = np.asarray(open_image(images["exif_rotated.jpg"][0]), np.float32)
    assert upright.shape == np.asarray(scene).shape
    assert np.abs(upright - np.asarray(scene, np.float32)).mean() < 6
    with pytest.raises(ImageError, match="megapixels"):
        open_image(images["bomb.png"][0].read_bytes())
    for name, (text, expect) in TEXTS.items():
        if expect.startswith("error:"):
            with pytest.raises(ValueError, match="empty"):
                e.search_by_text(text, 3)
            continue
        clean, notices = e.read_text(text)
        assert "\x00" not in clean and len(clean) <= 2000
        assert any(expect in n for n in notices), (name, notices)
        assert len(e.search_by_text(text, 3)) == 3
    for k in (0, -1, 1_000_000, 2.5):
        with pytest.raises(ValueError, match="k is"):
            e.search_by_text("a red circle", k)
    with pytest.raises(ValueError, match="alpha is"):
        e.search_composed(ROOT / "examples" / "scene_1.png", "a red circle", 1.5)
    for a in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="a is"):
            e.classify(ROOT / "examples" / "scene_1.png", "is there a star?", "weighted_sum", a)
    record("bad_input_engine", {"image_calls": len(rows),
                                "refused_with_message": sum(r["error"] is not None for r in rows),
                                "text_cases": len(TEXTS), "k_cases": 4, "a_cases": 4})


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_only_gallery_and_temporary_files_are_served(app, tmp_path):
    client, url, _, bundle = app
    base = url + "gradio_api/file="
    thumb = sorted((bundle / "gallery").glob("*.png"))[0]
    assert _get(base + str(thumb)) == 200
    for path in ("/etc/passwd", str(ROOT / "app.py"), str(bundle / "manifest.json"),
                 str(bundle / "image_encoder.onnx"), str(bundle / "gallery" / ".." /
                                                         "tokenizer.json")):
        assert _get(base + path) == 403, path
    # a file input given a path on the server, not an upload, is refused
    req = urllib.request.Request(
        url + "gradio_api/call/search_by_image", method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"data": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}},
                                  3]}).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        event = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(url + f"gradio_api/call/search_by_image/{event}",
                                timeout=30) as r:
        stream = r.read().decode()
    assert "event: error" in stream and "root:" not in stream
    # uploads over the cap are refused by the server itself (gradio_client would not even send)
    import httpx

    r = httpx.post(url + "gradio_api/upload", timeout=60,
                   files={"files": ("big.png", b"\x89PNG" + os.urandom(21 << 20))})
    assert r.status_code in (400, 413) and "size" in r.text.lower(), (r.status_code, r.text)
    r = httpx.post(url + "gradio_api/upload", timeout=60,
                   files={"files": ("small.png", (ROOT / "examples" / "scene_1.png").read_bytes())})
    assert r.status_code == 200
    _valid(client)


def test_no_pickle_is_loaded_anywhere():
    """Weights are safetensors; a .pt may only be read with weights_only=True."""
    import re

    offenders = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("mmdemo/**/*.py"), *ROOT.glob("export/**/*.py"),
                 *ROOT.glob("training/**/*.py")]:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path.name}: {m.group(0)}")
        for pat in (r"^\s*import pickle", r"pickle\.load", r"allow_pickle\s*=\s*True",
                    r"joblib\.load", r"dill\.load"):
            if re.search(pat, text, re.M):
                offenders.append(f"{path.name}: {pat}")
    assert not offenders, offenders


def test_share_warns_and_auth_puts_a_login_in_front(tiny_bundle, tmp_path):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--share", "--bundle",
                          str(tmp_path / "nowhere")], env=env, capture_output=True, text=True,
                         timeout=120)  # stops at the missing bundle: no link is ever asked for
    assert "public" in out.stderr and "Anyone who has the link" in out.stderr
    assert "--auth" in out.stderr and out.returncode != 0 and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--auth", "nopassword",
                          "--bundle", str(tiny_bundle)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "USER:PASSWORD" in out.stderr
    from gradio_client import Client

    with serve_app(tiny_bundle, tmp_path, ("--read-only",),
                   env={"MMDEMO_AUTH": "demo:s3cret"}) as (url, log, _):
        assert url.startswith("http://127.0.0.1:")
        with pytest.raises(Exception):  # noqa: B017 (gradio_client's error type varies)
            Client(url, verbose=False).predict("a red circle", 3, api_name="/search_by_text")
        assert _get(url + "config") in (401, 403) or b"login" in urllib.request.urlopen(
            url, timeout=10).read().lower()
        c = Client(url, auth=("demo", "s3cret"), verbose=False)
        assert len(c.predict("a red circle", 3, api_name="/search_by_text")) == 3
        assert "add_images" not in c.view_api(print_info=False, return_format="dict")[
            "named_endpoints"].__repr__()  # --read-only: no way to change the bundle
