"""Serving's numpy preprocessing equals training's torchvision eval transform, and
open_image reads hostile, damaged and very large files with bounded memory and a sentence."""

from __future__ import annotations

import io
import re
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, PngImagePlugin

from mmdemo import preprocess as pre
from mmdemo.preprocess import ImageError, PreprocessSpec, open_image, preprocess, to_pil
from training.data.transforms import eval_transform


def _images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    big = Image.fromarray(rng.integers(0, 256, (97, 130, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (70, 70), dtype=np.uint8), "L")
    pal = big.convert("P")
    return [rgb, big, rgba, gray, pal]


@pytest.mark.parametrize("interp", ["bilinear", "bicubic", "nearest"])
def test_parity_with_torchvision(interp):
    spec = PreprocessSpec(size=64, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3],
                          interpolation=interp)
    tf = eval_transform(spec)
    for img in _images():
        ref = tf(to_pil(img)).numpy()
        got = preprocess([img], spec)[0]
        diff = float(np.abs(ref - got).max())
        assert diff <= 1e-5, f"{img.mode} {img.size} {interp}: max abs diff {diff}"
        assert got.dtype == np.float32 and got.shape == (3, 64, 64)


def test_arrays_and_modes_are_accepted():
    spec = PreprocessSpec()
    arr = np.zeros((30, 20, 3), np.uint8)
    arr[..., 0] = 255
    x = preprocess([arr, arr.astype(np.float32) / 255, arr[..., :1]], spec)
    assert np.allclose(x[0], x[1])
    red = (1.0 - 0.5) / 0.25
    assert np.allclose(x[0][0], red) and np.allclose(x[0][1], (0 - 0.5) / 0.25)
    assert torch.from_numpy(x).isfinite().all()


@pytest.mark.parametrize("bad, msg", [(np.zeros((4, 4, 2), np.uint8), "expected"),
                                      (np.zeros((0, 4, 3), np.uint8), "no pixels"),
                                      (np.full((4, 4), np.nan), "non-finite"),
                                      ("cat.png", "cat.png: no such file"),
                                      (12, "expected an image")])
def test_bad_images_are_refused_with_the_reason(bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        preprocess([bad], PreprocessSpec())


# ---- open_image on hostile and unusual files --------------------------------------------------

MB = 2**20


def _status(key: str) -> int:
    """A VmRSS / VmHWM figure of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{key} is not in /proc/self/status")


def _peak_rss_growth(fn):
    """(fn(), how far the process's peak RSS rose above its RSS before, in bytes). Pillow and
    numpy allocate outside Python's allocator, so tracemalloc would not see them: the kernel's
    high-water mark, reset first through /proc/self/clear_refs, does."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS here: {e}")
    before = _status("VmRSS")
    result = fn()
    return result, _status("VmHWM") - before


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bilevel_png(w: int, h: int) -> bytes:
    """A w×h 1-bit black PNG, written row by row so the test never holds its pixels."""
    z = zlib.compressobj(9)
    row = bytes(1 + (w + 7) // 8)  # filter byte 0, then the row's bits
    data = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # bit depth 1, gray
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def _icon(image: bytes, bpp: int = 32) -> bytes:
    """An ICO file whose one entry (declared 256×256) holds `image` (PNG or bitmap bytes)."""
    return (struct.pack("<HHH", 0, 1, 1)
            + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, bpp, len(image), 22) + image)


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(size: tuple[int, int]) -> Image.Image:
    """An RGB image of size with a different smooth ramp in each channel (compresses well)."""
    g = Image.linear_gradient("L").resize(size, Image.BILINEAR)
    return Image.merge("RGB", (g, g.transpose(Image.Transpose.ROTATE_180),
                               g.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def _previous_to_pil(im: Image.Image) -> Image.Image:
    """to_pil as it was: 16-bit and float gray through a full-size float64 array, RGBA and
    transparent palettes over black, the rest converted."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8))
    if im.mode == "RGBA" or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im).convert("RGB")
    return im.convert("RGB")


def _previous_open_image(path: Path) -> Image.Image:
    """open_image as it was before the working size, the decode budget and the banded 16-bit
    conversion: the reference that images at or below WORK_PIXELS must still match exactly."""
    with Image.open(path) as im:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        im.load()
        return _previous_to_pil(ImageOps.exif_transpose(im))


def _converted_then_reduced(path: Path, k: int) -> Image.Image:
    """The whole image brought to a mode whose values average (as open_image does strip by
    strip), reduced k times with Image.reduce, then through the old to_pil."""
    with Image.open(path) as im:
        im.load()
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode == "1":
            im = im.convert("L")
        elif im.mode.startswith("I;16"):
            im = _previous_to_pil(im).convert("L")
        return _previous_to_pil(im.reduce(k))


@pytest.fixture(scope="module")
def big16(tmp_path_factory) -> Path:
    """An 8000×5000 16-bit gray PNG (40 megapixels, the limit; ~90 KB on disk), all 1000."""
    path = tmp_path_factory.mktemp("big") / "big16.png"
    Image.new("I;16", (8000, 5000), 1000).save(path)
    return path


def test_a_40_megapixel_16bit_png_opens_in_bounded_memory(big16):
    out, growth = _peak_rss_growth(lambda: open_image(big16))
    assert growth <= 300 * MB, f"peak RSS grew {growth / MB:.0f} MB opening {big16.name}"
    assert out.mode == "RGB" and out.size == (2000, 1250), (out.mode, out.size)  # reduced 4×
    assert out.getextrema() == ((4, 4),) * 3  # round(1000 / 65535 * 255)


@pytest.mark.slow
def test_eight_concurrent_40_megapixel_pngs_share_the_decode_budget(big16):
    data = big16.read_bytes()
    results: list = []

    def eight():
        def one(i):
            try:
                results.append(open_image(data, f"upload-{i}.png").size)
            except Exception as e:  # noqa: BLE001 (reported below)
                results.append(e)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    _, growth = _peak_rss_growth(eight)
    assert results == [(2000, 1250)] * 8, results
    assert growth < 1024 * MB, f"peak RSS grew {growth / MB:.0f} MB with 8 at once"
    assert pre._DECODE_BUDGET.free == pre.DECODE_BUDGET_BYTES  # every hold was given back


def test_the_decode_budget_bounds_what_threads_hold_at_once():
    budget = pre._DecodeBudget(100)
    held, peak, lock = [0], [0], threading.Lock()

    def use(n):
        with budget.hold(n):
            with lock:
                held[0] += min(n, 100)
                peak[0] = max(peak[0], held[0])
            time.sleep(0.01)
            with lock:
                held[0] -= min(n, 100)

    threads = [threading.Thread(target=use, args=(n,)) for n in (60, 60, 30, 250, 10, 90) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a hold never got its bytes"
    assert 0 < peak[0] <= 100 and budget.free == 100, (peak[0], budget.free)
    with pytest.raises(ValueError, match="-1 bytes"):
        with budget.hold(-1):
            pass


def test_an_icon_holding_a_huge_png_is_refused_before_decoding(tmp_path):
    ico = tmp_path / "favicon.ico"
    ico.write_bytes(_icon(_bilevel_png(12000, 12000)))  # 144 MP behind a 256×256 entry
    err, growth = _peak_rss_growth(lambda: pytest.raises(ImageError, open_image, ico))
    msg = str(err.value)
    assert "favicon.ico" in msg and "12000×12000" in msg and "megapixels" in msg, msg
    assert growth <= 20 * MB, f"peak RSS grew {growth / MB:.0f} MB refusing {ico.name}"
    # a bitmap entry whose header says 4000 wide is refused the same way
    dib = struct.pack("<IiiHHIIiiII", 40, 4000, 8000, 1, 32, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ImageError, match="4000×4000 image"):
        open_image(_icon(dib + bytes(64)), "cursor.ico")


def test_real_icons_open(tmp_path):
    src = _gradient((64, 64)).convert("RGBA")
    for fmt in ("png", "bmp"):
        data = _encoded(src, "ICO", sizes=[(16, 16), (32, 32), (64, 64)], bitmap_format=fmt)
        out = open_image(data, f"icon-{fmt}.ico")
        assert out.size == (64, 64) and out.mode == "RGB", (fmt, out.size)


def test_a_png_with_an_oversized_text_chunk_gets_a_message(tmp_path):
    for zipped in ("zTXt", "iTXt"):
        info = PngImagePlugin.PngInfo()
        big = "a" * (4 * MB)
        if zipped == "zTXt":
            info.add_text("comment", big, zip=True)
        else:
            info.add_itxt("comment", big, zip=True)
        data = _encoded(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG", pnginfo=info)
        assert len(data) < 100_000
        with pytest.raises(ImageError, match=r"meta\.png has a text \(metadata\) chunk larger "
                                             r"than 1 MB"):
            open_image(data, "meta.png")
        # the same chunk after the image data (read while decoding, not while opening)
        chunks, pos = [], 8
        while pos < len(data):
            n = struct.unpack(">I", data[pos:pos + 4])[0]
            chunks.append(data[pos:pos + 12 + n])
            pos += 12 + n
        text = next(c for c in chunks if c[4:8] == zipped.encode())
        rest = [c for c in chunks if c is not text]
        late = data[:8] + b"".join(rest[:-1]) + text + rest[-1]
        with pytest.raises(ImageError, match="meta-late.png has a text"):
            open_image(late, "meta-late.png")


def _damaged_variants() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    src = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    png = _encoded(src, "PNG")
    idat = png.index(b"IDAT")
    out = {f"cut-at-{n}.png": png[:n] for n in (8, 16, 30, idat + 100, len(png) // 2)}
    flipped = bytearray(png)
    for i in range(idat + 50, idat + 60):
        flipped[i] ^= 0xFF
    out["flipped-idat.png"] = bytes(flipped)
    jpg = _encoded(src, "JPEG", quality=90)
    out["garbage-after-soi.jpg"] = jpg[:2] + rng.integers(0, 256, 3000, np.uint8).tobytes()
    out["markers-then-garbage.jpg"] = jpg[:200] + rng.integers(0, 256, 3000, np.uint8).tobytes()
    out["cut.jpg"] = jpg[: len(jpg) // 2]
    bmp = _encoded(src, "BMP")
    for field, at, value in (("header-size", 14, 999), ("bits", 28, 7),
                             ("compression", 30, 9), ("width", 18, 100_000)):
        b = bytearray(bmp)
        b[at:at + (2 if field == "bits" else 4)] = value.to_bytes(2 if field == "bits" else 4,
                                                                  "little")
        out[f"bogus-{field}.bmp"] = bytes(b)
    out["cut.bmp"] = bmp[: len(bmp) // 2]
    gif = _encoded(src.convert("P"), "GIF")
    lzw = gif.index(b"\x2c", 13 + 768) + 10  # the image descriptor, then its LZW code size
    b = bytearray(gif)
    b[lzw] = 12
    out["lzw-code-size.gif"] = bytes(b)
    b = bytearray(gif)
    b[lzw + 2:lzw + 400] = b"\xff" * 398
    out["broken-lzw.gif"] = bytes(b)
    out["cut.gif"] = gif[: lzw + 200]
    tif = _encoded(src, "TIFF", compression="tiff_lzw")
    out["cut.tif"] = tif[: len(tif) // 2]
    webp = _encoded(src, "WEBP", quality=80)
    out["cut.webp"] = webp[: len(webp) // 2]
    ico = _encoded(src, "ICO", sizes=[(32, 32)])
    out["cut-directory.ico"] = ico[:14]
    out["entry-past-the-end.ico"] = ico[:18] + struct.pack("<I", 10**6) + ico[22:]
    out["cut.ico"] = ico[: len(ico) // 2]
    return out


_LIBRARY_WORDS = re.compile(r"Traceback|index out of range|/|\\|error|exception|Pillow|PIL|"
                            r"zlib|struct|Decompress|MAX_|truncated\)|\bFile \"", re.IGNORECASE)


@pytest.mark.parametrize("name", sorted(_damaged_variants()))
def test_damaged_files_are_refused_with_a_sentence_about_the_file(name, tmp_path):
    data = _damaged_variants()[name]
    (tmp_path / name).write_bytes(data)
    for source in (tmp_path / name, data):  # a server path, or an upload's bytes
        with pytest.raises(ImageError) as err:
            open_image(source, name)
        msg = str(err.value)
        assert msg.startswith(name + " ") and len(msg) < 300, msg
        assert not _LIBRARY_WORDS.search(msg.removeprefix(name)), msg
        assert re.search("damaged or truncated|not an image file|megapixels", msg), msg


def _small_files(folder: Path) -> dict[str, Path]:
    """Files at or below WORK_PIXELS in every mode open_image converts."""
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (97, 130, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 3
    gray16 = Image.fromarray(rng.integers(0, 65536, (70, 90), dtype=np.uint16))
    dark16 = Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint16))
    floats = Image.fromarray((rng.standard_normal((50, 60)) * 300).astype(np.float32))
    ints = Image.fromarray(rng.integers(-100, 70000, (50, 60)).astype(np.int32))
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"rgb.png": (rgb, {}), "rgba.png": (rgba, {}), "palette-transparent.png": (pal, {}),
             "gray16.png": (gray16, {}), "dark16.png": (dark16, {}), "float.tif": (floats, {}),
             "int32.tif": (ints, {}), "cmyk.jpg": (rgb.convert("CMYK"), {"quality": 95}),
             "bilevel.png": (rgb.convert("1"), {}), "gray-alpha.png": (rgba.convert("LA"), {}),
             "rotated.jpg": (rgb, {"exif": exif, "quality": 95}),
             "working-size.png": (_gradient((2000, 2000)), {})}  # exactly WORK_PIXELS
    out = {}
    for name, (im, kw) in files.items():
        im.save(folder / name, **kw)
        out[name] = folder / name
    return out


def test_images_at_or_below_the_working_size_read_exactly_as_before(tmp_path):
    for name, path in _small_files(tmp_path).items():
        got, ref = np.asarray(open_image(path)), np.asarray(_previous_open_image(path))
        assert got.shape == ref.shape and np.array_equal(got, ref), name
    rgb = tmp_path / "rgb.png"
    assert np.array_equal(np.asarray(open_image(rgb)), np.asarray(Image.open(rgb).convert("RGB")))
    assert open_image(tmp_path / "rotated.jpg").size == (97, 130)  # turned upright
    # and to_pil of 16-bit images handed over as PIL images, too
    for name in ("gray16.png", "dark16.png", "float.tif", "int32.tif"):
        with Image.open(tmp_path / name) as im:
            assert np.array_equal(np.asarray(to_pil(im)),
                                  np.asarray(_previous_open_image(tmp_path / name))), name


@pytest.mark.slow
def test_images_above_the_working_size_are_reduced_before_conversion(tmp_path):
    base = _gradient((2100, 2000))  # 4.2 MP: reduced 2×, to 1050×1000
    alpha = base.getchannel("R").point(lambda v: 255 - v)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.info["transparency"] = 0
    cases = {"rgb.png": base, "rgba.png": Image.merge("RGBA", (*base.split(), alpha)),
             "palette.png": palette, "bilevel.png": base.convert("1"),
             "gray16.png": Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)}
    for name, im in cases.items():
        im.save(tmp_path / name)
        got = open_image(tmp_path / name)
        assert got.size == (1050, 1000) and got.mode == "RGB", (name, got.size)
        want = _converted_then_reduced(tmp_path / name, 2)
        assert np.array_equal(np.asarray(got), np.asarray(want)), name


def test_large_jpegs_are_decoded_at_a_reduced_scale_and_still_turned_upright(tmp_path):
    photo = _gradient((4000, 3000))  # 12 MP: libjpeg decodes it at half scale
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "photo.jpg", quality=90)
    photo.save(tmp_path / "rotated.jpg", quality=90, exif=exif)
    got = open_image(tmp_path / "photo.jpg")
    assert got.size == (2000, 1500)
    diff = np.abs(np.asarray(got, np.float32) - np.asarray(photo.reduce(2), np.float32)).mean()
    assert diff < 2, f"mean abs difference {diff:.2f} from the box-reduced original"
    assert open_image(tmp_path / "rotated.jpg").size == (1500, 2000)
    exif_tif = photo.crop((0, 0, 2100, 2000))  # orientation in a TIFF's own tags, reduced 2×
    exif_tif.save(tmp_path / "rotated.tif", exif=exif)
    assert open_image(tmp_path / "rotated.tif").size == (1000, 1050)


def test_only_the_first_frame_is_read(tmp_path):
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    second = gif.index(b"\x2c", gif.index(b"\x2c") + 1)  # the second frame's descriptor
    out = open_image(gif[:second + 15], "cut-animation.gif")  # later frames cut off
    assert out.getpixel((0, 0)) == (255, 0, 0)
    pages = [Image.new("RGB", (200, 100), (9, 9, 9)), Image.new("RGB", (6000, 6000))]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:],
                  compression="tiff_lzw")
    out, growth = _peak_rss_growth(lambda: open_image(tmp_path / "pages.tif"))
    assert out.size == (200, 100) and growth < 20 * MB, (out.size, growth / MB)


def test_formats_outside_the_list_are_not_decoded(tmp_path):
    im = Image.new("RGB", (20, 10), (1, 2, 3))
    for fmt in ("PCX", "TGA", "SGI"):
        with pytest.raises(ImageError, match="not an image file mmdemo can read"):
            open_image(_encoded(im, fmt), f"picture.{fmt.lower()}")
    assert open_image(_encoded(im, "PPM"), "picture.ppm").getpixel((0, 0)) == (1, 2, 3)


def test_declared_size_reads_headers_only(big16, tmp_path):
    size, growth = _peak_rss_growth(lambda: pre.declared_size(big16))
    assert size == (8000, 5000) and growth <= 20 * MB, (size, growth / MB)
    with pytest.raises(ImageError, match="huge.ico is an icon file holding a 12000×12000"):
        pre.declared_size(_icon(_bilevel_png(12000, 12000)), "huge.ico")
    with pytest.raises(ImageError, match="notes.txt is not an image file"):
        pre.declared_size(b"just some words\n" * 10, "notes.txt")


@pytest.mark.slow
def test_webp_is_refused_above_its_own_limit_and_decodes_within_bounds(tmp_path):
    """libwebp decodes whole, with no scaled decode, at ~15 bytes a pixel: a 40 MP WebP grew
    a process by 611 MB, so WebP stops at 16 MP (refused from the header) and 16 MP fits."""
    from mmdemo.preprocess import FORMAT_MAX_PIXELS

    big = tmp_path / "big.webp"
    Image.new("RGB", (8000, 5000), (200, 30, 30)).save(big, "WEBP", quality=50)
    with pytest.raises(ImageError, match="limit for a WebP image is 16 megapixels"):
        open_image(big)
    ok = tmp_path / "ok.webp"
    side = int(FORMAT_MAX_PIXELS["WebP"] ** 0.5)
    Image.new("RGB", (side, side), (30, 200, 30)).save(ok, "WEBP", quality=50)
    _, growth = _peak_rss_growth(lambda: open_image(ok))
    assert growth <= 300 << 20, f"a 16 MP WebP grew the process by {growth >> 20} MB"
