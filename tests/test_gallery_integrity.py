"""Ordinary adds and removes never break a bundle: each sequence that once left a bundle that
would not load (remove then add, add-remove-add, repeated ids, a bad file in a zip, the CLI
beside a running app, threads and a second process writing at once) ends with a bundle that
loads, holds exactly what was acknowledged, and keeps every hash and thumbnail."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from mmdemo import BundleError, Engine, store
from mmdemo.index.__main__ import main as index_main
from tests.conftest import ROOT, copy_bundle, serve_app
from tests.report import record

pytestmark = pytest.mark.slow


def _png(seed: int, size=(90, 70), fmt: str = "PNG") -> bytes:
    """A distinct picture: random 4x4 blocks of color."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size,
                                                                                 Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _added(e: Engine) -> set[int]:
    return {i for i, it in e.gallery.items() if "source" in it}


def assert_consistent(bundle: Path, added: set[int] | None = None) -> Engine:
    """The bundle loads (every hash; both indexes hold exactly the gallery's ids), every
    thumbnail is there, and the user-added items are exactly `added`."""
    e = Engine.load(bundle)
    for it in e.gallery.values():
        assert (bundle / it["file"]).is_file(), it
        assert it["file"] in e.manifest["files"], it
    assert e.indexes["images"].live_ids() == set(e.gallery)
    assert e.indexes["captions"].live_ids() == set(e.captions)
    if added is not None:
        assert _added(e) == added, (sorted(_added(e) - added), sorted(added - _added(e)))
    return e


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    return copy_bundle(tiny_bundle, tmp_path / "bundle")


def test_remove_then_add_grows_the_index(bundle):
    """hnswlib counts removed elements against its capacity: a remove then adds of 1 and of
    40 once failed with 'The number of elements exceeds the specified limit'."""
    e = Engine.load(bundle)
    shipped = sorted(e.gallery)[:3]
    assert store.remove(e, shipped, shipped=True) == shipped  # the CLI may remove them
    one = e.add_images([_png(1)], names=["one.png"]).ids
    many = e.add_images([_png(100 + i) for i in range(40)],
                        names=[f"m{i}.png" for i in range(40)]).ids
    assert len(one) == 1 and len(many) == 40
    fresh = assert_consistent(bundle, set(one + many))
    assert not set(shipped) & set(fresh.gallery)
    assert fresh.search_by_image(_png(105), 1)[0].id == many[5]
    record("remove_then_add", {"removed": 3, "then_added": 41, "bundle_loads": True,
                               "index_capacity": e.indexes["images"]._index.get_max_elements()})


def test_ids_are_never_given_twice(bundle):
    e = Engine.load(bundle)
    first = e.add_images([_png(1)], names=["a.png"]).ids
    e.remove_images(first)
    second = e.add_images([_png(2)], names=["b.png"]).ids
    assert second[0] > first[0]
    e.remove_images(second)  # once failed: "ids not in the index"
    third = Engine.load(bundle).add_images([_png(3)], names=["c.png"]).ids  # a fresh process
    assert third[0] > second[0]
    assert json.loads((bundle / "manifest.json").read_text())["gallery"]["next_id"] == \
        third[0] + 1
    assert_consistent(bundle, set(third))
    record("add_remove_add", {"ids_given": [first[0], second[0], third[0]],
                              "all_different": True, "bundle_loads": True})


def test_bad_ids_are_refused_without_side_effects(bundle):
    e = Engine.load(bundle)
    mine = e.add_images([_png(1), _png(2)], names=["a.png", "b.png"]).ids
    e.remove_images(mine[1:])
    before = (bundle / "manifest.json").read_bytes()
    shipped = min(e.gallery)
    cases = {  # what a person types -> what the message must say
        f"{mine[0]} {mine[0]}": "given more than once",
        f"{mine[1]}": "was removed already",
        "99999999": "no gallery item with id 99999999",
        f"{shipped}": "one of the bundle's own images",
        "²": "'²' is not a gallery id",
        "٩٥٠١": "is not a gallery id",  # Arabic-Indic digits: once removed 9501
        "5" * 5000: "is not a gallery id",
        "-3": "is not a gallery id",
        "1e3": "is not a gallery id",
        " , ": "Type the ids to remove",
    }
    for typed, want in cases.items():
        with pytest.raises(store.StoreError, match=want):
            e.remove_images(store.parse_ids(typed))
    assert (bundle / "manifest.json").read_bytes() == before  # nothing was written
    assert mine[0] in e.gallery
    e.remove_images([mine[0]])  # and it still goes, once asked right
    later = e.add_images([_png(3)], names=["c.png"]).ids
    assert_consistent(bundle, set(later))
    record("bad_ids", {"tried": len(cases), "refused_without_change": len(cases),
                       "typed": list(cases)[:9]})


def _ztxt_png(seed: int) -> bytes:
    """A good picture carrying a 4 MB compressed text chunk (Pillow refuses such chunks)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (4 << 20), zip=True)
    im = Image.open(io.BytesIO(_png(seed)))
    buf = io.BytesIO()
    im.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def test_a_bad_file_in_a_zip_is_skipped_and_the_rest_added(bundle, tmp_path):
    """33 good PNGs and one with a 4 MB zTXt chunk: once the add failed after 32 were indexed,
    and the next add saved them with their thumbnails deleted."""
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as zf:
        for i in range(33):
            zf.writestr(f"good{i:02d}.png", _png(10 + i))
        zf.writestr("ztxt.png", _ztxt_png(99))
    e = Engine.load(bundle)
    uploads, skipped = store.collect([tmp_path / "photos.zip"])
    added = store.add(e, uploads)
    assert len(added.ids) == 33 and not skipped
    assert [n for n, _ in added.skipped] == ["photos.zip:ztxt.png"], added.skipped
    why = added.skipped[0][1]
    assert "Traceback" not in why and "Decompressed" not in why, why
    more = e.add_images([_png(200)], names=["next.png"]).ids  # the next add keeps them all
    fresh = assert_consistent(bundle, set(added.ids + more))
    assert fresh.search_by_image(_png(20), 1)[0].id == added.ids[10]
    record("zip_with_a_bad_member", {"good": 33, "added": len(added.ids), "skipped": 1,
                                     "reason": why, "thumbnails_after_next_add": 34})


def test_a_failed_add_leaves_nothing_behind(bundle):
    """An add that fails mid-way (here: cancelled from its progress callback after the first
    batch) leaves no item in memory, no file on disk and no change in the manifest."""
    e = Engine.load(bundle)
    before = (bundle / "manifest.json").read_bytes()
    files = sorted(p.name for p in (bundle / "gallery").iterdir())
    n = len(e.gallery)

    def cancel(done, total):
        if done >= 4:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        store.add(e, [store.Upload(f"p{i}.png", _png(i)) for i in range(12)], cancel, batch=4)
    assert len(e.gallery) == n and len(e.indexes["images"]) == n
    assert all(h.id in e.gallery for h in e.search_by_image(_png(1), 5))
    assert (bundle / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (bundle / "gallery").iterdir()) == files
    ok = e.add_images([_png(1)], names=["p1.png"]).ids
    assert_consistent(bundle, set(ok))
    record("failed_add", {"uploads": 12, "cancelled_after": 4, "left_in_memory": 0,
                          "left_on_disk": 0, "manifest_unchanged": True})


def test_the_same_image_is_reported_with_its_id(bundle):
    e = Engine.load(bundle)
    first = e.add_images([_png(5)], names=["cat.png"]).ids
    again = e.add_images([_png(5, fmt="BMP"), _png(6)], names=["cat.bmp", "dog.png"])
    assert again.existing == {"cat.bmp": first[0]} and len(again.ids) == 1
    assert any("already in the gallery as id" in why for _, why in again.skipped)
    assert_consistent(bundle, set(first + again.ids))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mmdemo.index", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def test_a_running_engine_sees_what_the_cli_changed(bundle, tmp_path):
    app = Engine.load(bundle)
    mine = app.add_images([_png(1), _png(2)], names=["a.png", "b.png"]).ids
    (tmp_path / "new.png").write_bytes(_png(3))
    r = _cli("remove", "--bundle", str(bundle), str(mine[0]))
    assert r.returncode == 0, r.stderr
    r = _cli("add", "--bundle", str(bundle), str(tmp_path / "new.png"))
    assert r.returncode == 0, r.stderr
    hits = app.search_by_image(_png(1), len(app.gallery))  # no reload asked for
    assert mine[0] not in {h.id for h in hits}
    assert all(Path(h.image).is_file() for h in hits)  # no thumbnail that is gone
    top = app.search_by_image(tmp_path / "new.png", 1)[0]
    assert top.id not in mine and app.gallery[top.id]["source"] == "new.png"
    assert_consistent(bundle, {mine[1], top.id})
    record("cli_beside_a_running_app", {"cli_removed": 1, "cli_added": 1,
                                        "seen_without_restart": True})


def test_threads_and_a_second_process_writing_at_once(bundle, tmp_path):
    """Four threads add and remove their own images (once: ids reused, then a bundle that
    would not load) while a second process adds through the CLI; bounded in operations."""
    e = Engine.load(bundle)
    acked: set[int] = set()
    lock = threading.Lock()
    errors: list[str] = []
    counts = {"adds": 0, "removes": 0}

    def writer(w: int):
        rng = np.random.default_rng(w)
        mine: list[int] = []
        for step in range(14):
            try:
                if mine and rng.random() < 0.4:
                    gone = mine.pop(int(rng.integers(len(mine))))
                    e.remove_images([gone])
                    with lock:
                        acked.discard(gone)
                        counts["removes"] += 1
                else:
                    ids = e.add_images([_png(1000 * w + step)],
                                       names=[f"w{w}-{step}.png"]).ids
                    mine += ids
                    with lock:
                        acked.update(ids)
                        counts["adds"] += 1
            except Exception as err:  # noqa: BLE001 (collected and reported below)
                errors.append(f"{type(err).__name__}: {err}")

    folder = tmp_path / "cli"
    folder.mkdir()
    for i in range(12):
        (folder / f"c{i:02d}.png").write_bytes(_png(5000 + i))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = subprocess.Popen([sys.executable, "-m", "mmdemo.index", "add", "--bundle", str(bundle),
                            str(folder)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    out, err = cli.communicate(timeout=240)
    assert cli.returncode == 0, err
    assert not errors, errors[:3]
    fresh = assert_consistent(bundle)
    cli_ids = {i for i, it in fresh.gallery.items() if it.get("source", "").startswith("c")}
    assert len(cli_ids) == 12
    assert _added(fresh) == acked | cli_ids
    record("concurrent_writers", {"threads": 4, "adds": counts["adds"],
                                  "removes": counts["removes"], "cli_images": 12,
                                  "errors": 0, "seconds": round(time.time() - t0, 1),
                                  "gallery_equals_acknowledged": True})


def test_a_bundle_whose_parts_disagree_is_named_and_repaired(bundle, capsys):
    """What an older mmdemo could leave: a gallery with an item its index lacks, and a
    thumbnail deleted. Loading says so and names the repair; the repair restores it."""
    e = Engine.load(bundle)
    ids = e.add_images([_png(1), _png(2), _png(3)], names=["a.png", "b.png", "c.png"]).ids
    e.indexes["images"].remove([ids[0]])  # the index loses one item ...
    gone = e.gallery[ids[1]]["file"]
    store.commit(e, [])
    (bundle / gone).unlink()  # ... and a thumbnail goes
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"].pop(gone)
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="python -m mmdemo.index repair"):
        Engine.load(bundle)
    assert index_main(["repair", "--bundle", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "1 dropped" in out and "1 images" in out, out
    fresh = assert_consistent(bundle, {ids[0], ids[2]})
    assert fresh.search_by_image(_png(1), 1)[0].id == ids[0]  # embedded again
    later = fresh.add_images([_png(4)], names=["d.png"]).ids
    assert later[0] > ids[2]
    assert index_main(["repair", "--bundle", str(bundle)]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    record("repair", {"refused_at_load": True, "items_kept": 2, "dropped_missing_thumbnail": 1,
                      "embedded_again": 1, "ids_kept": True})


def test_cli_messages_have_no_traceback(bundle, tmp_path):
    (tmp_path / "broken.png").write_bytes(_png(1)[:60])
    (tmp_path / "good.png").write_bytes(_png(2))
    r = _cli("add", "--bundle", str(bundle), str(tmp_path / "broken.png"),
             str(tmp_path / "good.png"))
    assert r.returncode == 0 and "added 1 image(s)" in r.stdout, r.stderr
    assert "broken.png" in r.stderr and "Traceback" not in r.stderr
    for args, want in [(("5", "5"), "given more than once"), (("²",), "is not a gallery id"),
                       (("99999999",), "no gallery item")]:
        r = _cli("remove", "--bundle", str(bundle), *args)
        assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_on_a_shared_app_visitors_remove_only_their_own(tiny_bundle, tmp_path):
    """A Space with writes allowed (SPACE_ID set, MMDEMO_READ_ONLY=0): one visitor cannot
    remove another's images or the bundle's own; a visitor removes their own."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    shipped = min(Engine.load(bundle).gallery)
    (tmp_path / "mine.png").write_bytes(_png(1))
    with serve_app(bundle, tmp_path / "app", env={"SPACE_ID": "mmdemo/test",
                                                  "MMDEMO_READ_ONLY": "0"}) as (url, _, _):
        alice, bob = Client(url, verbose=False), Client(url, verbose=False)
        added, _ = alice.predict([handle_file(str(tmp_path / "mine.png"))],
                                 api_name="/add_images")
        mine = int(added[0]["caption"].split(" ")[0].lstrip("#"))
        for who, ids, want in ((bob, mine, "not added in this session"),
                               (alice, shipped, "one of the bundle's own images")):
            with pytest.raises(AppError, match=want):
                who.predict(str(ids), api_name="/remove_images")
        assert "Removed 1 item" in alice.predict(str(mine), api_name="/remove_images")
    assert_consistent(bundle, set())
    record("shared_app_removals", {"other_visitor_refused": True, "shipped_refused": True,
                                   "own_removed": True})


def test_a_read_only_app_answers_writes_with_a_message(tiny_bundle, tmp_path):
    """add_images / remove_images on a --read-only app: once HTTP 500 and a traceback in the
    log; now a 404 that says why. The bundle is untouched."""
    import urllib.error
    import urllib.request

    before = (tiny_bundle / "manifest.json").read_bytes()
    with serve_app(tiny_bundle, tmp_path, ("--read-only",)) as (url, log, _):
        for name in ("add_images", "remove_images"):
            req = urllib.request.Request(url + f"gradio_api/call/{name}", method="POST",
                                         data=json.dumps({"data": [[]]}).encode(),
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=30)
            assert err.value.code == 404
            assert "read-only" in json.loads(err.value.read())["error"]
        assert "Traceback" not in log.read_text()
    assert (tiny_bundle / "manifest.json").read_bytes() == before
    record("read_only_writes", {"endpoints": ["add_images", "remove_images"], "http": 404})


def test_odd_zips_and_caption_files_get_a_reason_each(bundle, tmp_path):
    """Nested and image-less zips, names with a newline or not UTF-8, encrypted-looking junk,
    caption files in UTF-16 or binary, a JSONL caption given as a string: each is named with
    why, the good images still go in, and `list` prints one line per item."""
    with zipfile.ZipFile(tmp_path / "inner.zip", "w") as zf:
        zf.writestr("x.png", _png(1))
    with zipfile.ZipFile(tmp_path / "odd.zip", "w") as zf:
        zf.write(tmp_path / "inner.zip", "inner.zip")
        zf.writestr("evil\nname.png", _png(2))
        zf.writestr("good.png", _png(3))
        zf.writestr("utf16.png", _png(4))
        zf.writestr("utf16.txt", "a red circle\n".encode("utf-16"))
        zf.writestr("binary.png", _png(5))
        zf.writestr("binary.txt", b"\x00\x01a caption\x02\x7f")  # UTF-8, not text
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("readme.md", "no images here")
    with zipfile.ZipFile(tmp_path / "badname.zip", "w") as zf:
        zf.writestr("café.png", _png(6))  # flagged "names are UTF-8" ...
    raw = (tmp_path / "badname.zip").read_bytes().replace("é".encode(), b"\xff\xfe")  # not
    (tmp_path / "badname.zip").write_bytes(raw)
    (tmp_path / "notazip.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    (tmp_path / "caps.jsonl").write_text(json.dumps({"file": "good.png",
                                                     "captions": "a string"}) + "\n")
    with pytest.raises(store.StoreError, match="line 1: 'captions' must be a list of strings"):
        store.collect([tmp_path / "odd.zip"], tmp_path / "caps.jsonl")
    paths = [tmp_path / n for n in ("odd.zip", "empty.zip", "badname.zip", "notazip.zip")]
    uploads, skipped = store.collect(paths)
    e = Engine.load(bundle)
    added = store.add(e, uploads)
    why = dict(skipped + added.skipped)
    assert "zip inside the zip" in why["odd.zip:inner.zip"]
    assert "control characters in its name" in why["odd.zip:evil?name.png"]
    assert "not UTF-8 text" in why["the captions of odd.zip:utf16.png"]
    assert "binary data" in why["the captions of odd.zip:binary.png"]
    assert "holds no image files" in why["empty.zip"]
    assert "not valid UTF-8" in why["badname.zip"]
    assert "not a zip file that can be read" in why["notazip.zip"]
    assert len(added.ids) == 3  # good, utf16 and binary: the images, without those captions
    assert all(not e.gallery[i]["captions"] for i in added.ids)
    assert all("\n" not in msg and str(tmp_path) not in msg for msg in why.values())
    assert index_main(["list", "--bundle", str(bundle), "--added"]) == 0
    assert_consistent(bundle, set(added.ids))
    record("odd_zips_and_caption_files", {"cases": [{"input": k, "answer": v}
                                                    for k, v in sorted(why.items())],
                                          "images_added": len(added.ids)})
