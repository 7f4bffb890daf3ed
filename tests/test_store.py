"""Your own images: python -m mmdemo.index add/remove/list on real files, folders, zips and
caption files; what is added persists, is searchable, and no writer loses another's images."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdemo import Engine
from mmdemo.index.__main__ import main
from tests.conftest import ROOT, copy_bundle

pytestmark = pytest.mark.slow


def _png(seed: int, size=(90, 70)) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize(size)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    return copy_bundle(tiny_bundle, tmp_path / "bundle")


def test_add_folder_zip_and_captions_then_remove(bundle, tmp_path, capsys):
    n0 = len(Engine.load(bundle).gallery)
    folder = tmp_path / "photos" / "trip"
    folder.mkdir(parents=True)
    (folder / "beach.png").write_bytes(_png(1))
    (folder / "beach.txt").write_text("a sunny beach\nsand and sea\n")
    (folder / "notes.md").write_text("not an image: ignored")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "caps.jsonl").write_text(json.dumps({"file": "cat.png",
                                                     "captions": ["a cat on a sofa"]}) + "\n")
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:
        zf.writestr("cat.png", _png(2))
        zf.writestr("../../escape.png", _png(3))  # read in memory: nothing lands outside
        zf.writestr("dog.png", _png(4))
        zf.writestr("dog.txt", "a dog in the park\n")
    code = main(["add", "--bundle", str(bundle), str(tmp_path / "photos"),
                 str(tmp_path / "more.zip"), "--captions", str(tmp_path / "caps.jsonl")])
    out, err = capsys.readouterr()
    assert code == 0 and "added 4 image(s)" in out
    assert "broken.jpg" in err and ("damaged or truncated" in err or "not an image" in err), err
    assert not (tmp_path.parent / "escape.png").exists() and not list(tmp_path.glob("*.png"))
    e = Engine.load(bundle)  # persisted, hashes and all
    added = {it["source"]: it for it in e.gallery.values() if "source" in it}
    assert len(e.gallery) == n0 + 4 and set(added) == {
        "trip/beach.png", "more.zip:cat.png", "more.zip:../../escape.png", "more.zip:dog.png"}
    assert added["trip/beach.png"]["captions"] == ["a sunny beach", "sand and sea"]
    assert added["more.zip:cat.png"]["captions"] == ["a cat on a sofa"]  # from the JSONL
    assert added["more.zip:dog.png"]["captions"] == ["a dog in the park"]
    assert len(e.indexes["captions"]) == len(e.captions)
    # each added image is its own nearest neighbour, and its caption finds it among captions
    beach = added["trip/beach.png"]
    assert e.search_by_image(folder / "beach.png", 1)[0].id == beach["id"]
    texts = [h.text for h in e.search_captions(folder / "beach.png", len(e.captions))]
    assert "a sunny beach" in texts
    assert main(["list", "--bundle", str(bundle), "--added"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    assert main(["remove", "--bundle", str(bundle), str(beach["id"])]) == 0
    e = Engine.load(bundle)
    assert beach["id"] not in e.gallery and "a sunny beach" not in {t for t, _ in
                                                                   e.captions.values()}
    assert all(h.id != beach["id"] for h in e.search_by_image(folder / "beach.png", 10))
    assert not (bundle / beach["file"]).exists()  # its thumbnail went with it


def test_cli_errors_are_messages(bundle, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mmdemo.index", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    r = run("add", "--bundle", str(tmp_path / "nowhere"), str(tmp_path))
    assert r.returncode == 2 and "not a bundle" in r.stderr and "Traceback" not in r.stderr
    r = run("remove", "--bundle", str(bundle), "99999999")
    assert r.returncode == 2 and "no gallery item with id 99999999" in r.stderr
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    r = run("add", "--bundle", str(bundle), str(tmp_path), "--captions",
            str(tmp_path / "bad.jsonl"))
    assert r.returncode == 2 and "bad.jsonl, line 1" in r.stderr
    (tmp_path / "text.png").write_text("hello")
    r = run("add", "--bundle", str(bundle), str(tmp_path / "text.png"))
    assert r.returncode == 1 and "text.png" in r.stderr and "nothing was added" in r.stderr
    assert "Traceback" not in r.stderr


def test_two_writers_lose_nothing(bundle, tmp_path):
    """The app's engine and the CLI both add: each sees the other's images before writing."""
    app_engine = Engine.load(bundle)
    n0 = len(app_engine.gallery)
    (tmp_path / "cli").mkdir()
    for i in range(3):
        (tmp_path / "cli" / f"c{i}.png").write_bytes(_png(10 + i))
    assert main(["add", "--bundle", str(bundle), str(tmp_path / "cli")]) == 0
    added = app_engine.add_images([_png(20), _png(21)], names=["a.png", "b.png"])
    assert len(added.ids) == 2 and len(app_engine.gallery) == n0 + 5
    assert len(Engine.load(bundle).gallery) == n0 + 5
    assert len(set(app_engine.gallery)) == len(app_engine.gallery)
