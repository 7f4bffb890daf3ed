"""Bounded memory and time: the app on a copy of the tiny bundle gets the uploads that once grew
a server by gigabytes (16-bit 40-megapixel PNGs, zips of them, zip bombs, caption files of
100,000 lines, an ICO holding a huge PNG, a 52 MB JSON body, 5,000 images at once), one at a
time and eight at once, while a normal search runs beside them. The server's peak RSS growth is
read from /proc (VmHWM after resetting it through clear_refs), not guessed."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, copy_bundle, serve_app
from tests.report import record

pytestmark = pytest.mark.slow
MB = 1 << 20
SINGLE_MB, CONCURRENT_MB, SEARCH_S = 300, 1024, 2.0  # the targets


def _status(pid: int, key: str) -> int:
    """A field of /proc/PID/status in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak(pid: int) -> int:
    """Set the peak RSS to the current RSS (Linux clear_refs 5); returns it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status(pid, "VmRSS")


def _png16(path: Path, size=(8000, 5000), row: int = 97) -> Path:
    """A 16-bit grayscale PNG of 40 megapixels: ~80 KB on disk, 80 MB as 16-bit pixels."""
    arr = np.zeros(size[::-1], np.uint16)
    arr[::row, :] = 40000  # some structure, still tiny once compressed
    Image.fromarray(arr).save(path)
    return path


def _small_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((48, 48),
                                                                                 Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _ico_with_png(path: Path, side: int = 12000) -> Path:
    """An ICO whose one entry is a PNG of side × side (the directory says 256 × 256)."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, "PNG")
    png = buf.getvalue()
    header = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32,
                                                        len(png), 22)
    path.write_bytes(header + png)
    return path


def attack_files(folder: Path) -> dict[str, Path]:
    """name -> the file one add_images request uploads."""
    folder.mkdir(parents=True, exist_ok=True)
    big = _png16(folder / "png16_40mp.png")
    files = {"one 16-bit 40 MP PNG": big}
    with zipfile.ZipFile(folder / "zip32.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(32):  # 32 different pictures, or all but one would be the same image
            zf.write(_png16(folder / f"big{i:02d}.png", row=31 + 2 * i), f"big{i:02d}.png")
    files["zip of 32 16-bit 40 MP PNGs"] = folder / "zip32.zip"
    with zipfile.ZipFile(folder / "captions100k.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", _small_png(1))
        zf.writestr("a.txt", "a red circle left of a blue square\n" * 100_000)
    files["zip with 100,000 caption lines"] = folder / "captions100k.zip"
    with zipfile.ZipFile(folder / "twenty.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(20):
            zf.writestr(f"d{i}/same.png", _small_png(100 + i))
            zf.writestr(f"d{i}/same.txt", "a caption line\n" * 2000)
    files["20 images x 2,000 caption lines"] = folder / "twenty.zip"
    for kind, method, gb in (("deflate", zipfile.ZIP_DEFLATED, 1), ("LZMA", zipfile.ZIP_LZMA,
                                                                     0.25)):
        path = folder / f"bomb_{kind}.zip"
        with zipfile.ZipFile(path, "w", method) as zf, zf.open("bomb.png", "w",
                                                               force_zip64=True) as f:
            for _ in range(int(gb * 64)):
                f.write(bytes(16 * MB))  # zeros: ~1000:1 deflated, far more in LZMA
        files[f"zip bomb ({kind}, {gb} GB of zeros)"] = path
    with zipfile.ZipFile(folder / "bomb_small.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.bmp", bytes(19 * MB))  # under the 20 MB cap, ~1000:1 deflated
    files["zip bomb under the size cap (19 MB of zeros)"] = folder / "bomb_small.zip"
    files["ICO holding a 12000x12000 PNG"] = _ico_with_png(folder / "huge.ico")
    with zipfile.ZipFile(folder / "many.zip", "w", zipfile.ZIP_STORED) as zf:
        for i in range(5000):
            zf.writestr(f"m{i:04d}.png", _small_png(1000 + i))
    files["5,000 images in one request"] = folder / "many.zip"
    (folder / "lines.png").write_bytes(_small_png(7))
    (folder / "lines.txt").write_text("caption\n" * 20_000)
    files["an image with 20,000 caption lines"] = folder / "lines.png"
    return files


def _search_ms(url: str) -> float:
    """One search_by_text through Gradio's HTTP API, in ms."""
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "gradio_api/call/search_by_text", method="POST",
                                 data=json.dumps({"data": ["a red circle", 5]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        event = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(url + f"gradio_api/call/search_by_text/{event}",
                                timeout=60) as r:
        body = r.read().decode()
    assert "event: complete" in body, body[:300]
    return (time.perf_counter() - t0) * 1e3


class Searcher(threading.Thread):
    """Searches every 0.25 s until stopped; keeps the slowest answer."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.times, self.errors = url, threading.Event(), [], []

    def run(self):
        while not self.stop.is_set():
            try:
                self.times.append(_search_ms(self.url))
            except OSError as e:  # reported by the test
                self.errors.append(f"{type(e).__name__}: {e}")
            self.stop.wait(0.25)


def _add(client, paths: list[Path]) -> tuple[str | None, str | None]:
    """(the add's report, or None; its error message, or None)."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    sidecars = [p.with_suffix(".txt") for p in paths if p.with_suffix(".txt").is_file()]
    try:
        _, note = client.predict([handle_file(str(p)) for p in paths + sidecars],
                                 api_name="/add_images")
        return note, None
    except AppError as e:
        return None, str(e)


def test_uploads_run_in_bounded_memory_and_time(tiny_bundle, tmp_path):
    from gradio_client import Client

    files = attack_files(tmp_path / "files")
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    rows = []
    with serve_app(bundle, tmp_path / "app") as (url, log, proc):
        client = Client(url, verbose=False)
        _search_ms(url)
        searcher = Searcher(url)
        searcher.start()
        for name, path in files.items():
            base = _reset_peak(proc.pid)
            t0 = time.perf_counter()
            note, error = _add(client, [path])
            seconds = time.perf_counter() - t0
            growth = (_status(proc.pid, "VmHWM") - base) / MB
            assert proc.poll() is None, log.read_text()[-3000:]
            text = note or error or ""
            assert "Traceback" not in text and str(tmp_path) not in text, text
            rows.append({"input": name, "peak_growth_mb": round(growth), "seconds":
                         round(seconds, 1), "answer": " / ".join(text.splitlines()[:3])[:300]})
            print(rows[-1], flush=True)
        # a 52 MB JSON body to an API route
        base = _reset_peak(proc.pid)
        body = json.dumps({"data": ["a red circle " * (4 << 20), 5]}).encode()
        t0 = time.perf_counter()
        try:
            urllib.request.urlopen(urllib.request.Request(
                url + "gradio_api/call/search_by_text", data=body, method="POST",
                headers={"Content-Type": "application/json"}), timeout=60)
            status = 200
        except urllib.error.HTTPError as e:
            status = e.code
        except (ConnectionError, urllib.error.URLError):
            status = 413  # refused (and the connection closed) before the body was read
        rows.append({"input": f"a {len(body) // MB} MB JSON body", "peak_growth_mb": round(
            (_status(proc.pid, "VmHWM") - base) / MB), "seconds": round(
            time.perf_counter() - t0, 1), "answer": f"HTTP {status}"})
        print(rows[-1], flush=True)
        assert status == 413, status

        # a path the client never uploaded: refused without naming the server's folders
        req = urllib.request.Request(url + "gradio_api/call/add_images", method="POST",
                                     data=json.dumps({"data": [[{"path": "app.py", "meta": {
                                         "_type": "gradio.FileData"}}]]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            event = json.loads(r.read())["event_id"]
        with urllib.request.urlopen(url + f"gradio_api/call/add_images/{event}",
                                    timeout=60) as r:
            body = r.read().decode()
        assert "event: error" in body and str(ROOT) not in body and "/" not in body.split(
            "data:", 1)[1], body
        rows.append({"input": "a server path given as an upload", "peak_growth_mb": 0,
                     "seconds": 0, "answer": "refused; no server path in the answer"})

        # eight worst cases at once: the 16-bit 40 MP PNG to the search and add endpoints
        from gradio_client import handle_file
        from gradio_client.exceptions import AppError

        base = _reset_peak(proc.pid)
        big = files["one 16-bit 40 MP PNG"]
        errors: list[str] = []

        def hit(i: int):
            c = Client(url, verbose=False)
            try:
                if i % 2:
                    c.predict(handle_file(str(big)), 5, api_name="/search_by_image")
                else:
                    _add(c, [big])
            except AppError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=hit, args=(i,)) for i in range(8)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        concurrent = (_status(proc.pid, "VmHWM") - base) / MB
        rows.append({"input": "8 at once: the 16-bit 40 MP PNG to search_by_image and "
                              "add_images", "peak_growth_mb": round(concurrent),
                     "seconds": round(time.perf_counter() - t0, 1), "answer": "; ".join(
                         sorted(set(errors)))[:200]})
        searcher.stop.set()
        searcher.join(60)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert not searcher.errors, searcher.errors[:3]
        slowest = max(searcher.times) / 1e3
        gallery = client.predict("a red circle", 3, api_name="/search_by_text")
        assert len(gallery) == 3
    summary = {"cases": rows, "slowest_search_s": round(slowest, 2),
               "searches_during": len(searcher.times), "server_alive": True,
               "targets": {"single_mb": SINGLE_MB, "concurrent_mb": CONCURRENT_MB,
                           "search_s": SEARCH_S}}
    record("upload_limits", summary)
    print(json.dumps(summary, indent=1))
    worst = max(rows[:-1], key=lambda r: r["peak_growth_mb"])
    assert worst["peak_growth_mb"] <= SINGLE_MB, rows
    assert concurrent <= CONCURRENT_MB, rows
    assert slowest <= SEARCH_S, (slowest, rows)
    by = {r["input"]: r["answer"] for r in rows}
    assert "Added 10 image(s)" in by["zip of 32 16-bit 40 MP PNGs"], by  # 400 MP a request
    assert "Added 1000 image(s)" in by["5,000 images in one request"], by
    assert "Nothing was added" in by["zip bomb (deflate, 1 GB of zeros)"], by
    assert "times larger than it is stored" in by["zip bomb under the size cap (19 MB of "
                                                  "zeros)"], by
    assert "Added 20 image(s)" in by["20 images x 2,000 caption lines"], by
