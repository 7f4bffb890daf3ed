"""The page as a person uses it: Debian's headless Chromium, driven by Playwright through
`executable_path` (no browser download), types, uploads, clicks and reads every tab of app.py
served on a copy of the tiny bundle. A full-page screenshot of each step is kept in
artifacts/screenshots/ (and the first is copied to $MMDEMO_SCREENSHOT when it is set).

Gradio pages never reach network idle: every wait is for an element, at most 30 s."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import expect, sync_playwright

from tests.conftest import ROOT, copy_bundle, serve_app

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "artifacts" / "screenshots"
WAIT = 30_000  # ms, any one wait for the page
expect.set_options(timeout=WAIT)
SCENE = ROOT / "examples"
CAPTION = re.compile(r"(-?\d\.\d{3}) · (.+)")  # a result's caption: "0.812 · a red circle"
SETTLED = """() => document.getAnimations().every(a => a.playState !== 'running'
    || a.effect?.target?.closest?.('.toast-body'))"""  # fades and tweens done; toasts count down


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt")
        pytest.skip("Debian's chromium is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(browser, tiny_bundle, tmp_path_factory):
    """app.py on a copy of the tiny bundle (a test adds images to it); yields (url, bundle)."""
    folder = tmp_path_factory.mktemp("browser")
    bundle = copy_bundle(tiny_bundle, folder / "bundle")
    with serve_app(bundle, folder) as (url, _, _):
        yield url, bundle


@pytest.fixture
def page(browser, app):
    """A fresh page of the app, loaded as far as its tabs."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT)
    page.goto(app[0], wait_until="load", timeout=60_000)
    page.get_by_role("tab", name="About").wait_for()
    yield page
    page.close()


def _open(page, *tabs: str):
    """Clicks the tabs in turn; returns the innermost tab panel now showing."""
    for name in tabs:
        tab = page.get_by_role("tab", name=name, exact=True)
        tab.click()
        expect(tab).to_have_attribute("aria-selected", "true")
    return page.locator("[role=tabpanel]:visible").last


def _upload(panel, path: Path, nth: int = 0) -> None:
    """Uploads a file into the panel's nth image input and waits until the image shows it."""
    panel.locator("input[type=file]").nth(nth).set_input_files(str(path))
    frame = panel.locator("[data-testid=image] img").nth(nth)
    expect(frame).to_have_attribute("src", re.compile(re.escape(path.name) + "$"))


def _captions(panel) -> list[tuple[float, str]]:
    """(score, caption) of every result the panel's gallery shows."""
    texts = panel.locator(".thumbnail-item .caption-label").all_inner_texts()
    out = [CAPTION.fullmatch(t.strip()) for t in texts]
    assert all(out), texts
    return [(float(m[1]), m[2]) for m in out]


def _results(panel, n: int = 12) -> list[tuple[float, str]]:
    """Waits for n thumbnails (12: the default) and returns their (score, caption), best first."""
    expect(panel.locator(".thumbnail-item")).to_have_count(n)
    found = _captions(panel)
    assert [s for s, _ in found] == sorted((s for s, _ in found), reverse=True), found
    return found


def _shot(page, step: str) -> Path:
    """A full-page screenshot, once Gradio's fades and tweens have finished."""
    page.wait_for_function(SETTLED)
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{step}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_text_search_then_click_a_result(page):
    panel = _open(page, "Retrieval", "Text → images")
    for tab in ("Fused classification", "Generation", "About", "Image → images",
                "Image → captions", "Image + text", "Your images"):
        expect(page.get_by_role("tab", name=tab, exact=True)).to_have_count(1)
    expect(panel.locator(".thumbnail-item")).to_have_count(0)
    panel.get_by_label("Description").fill("a blue square")
    panel.get_by_role("button", name="Search").click()
    found = _results(panel)
    shot = _shot(page, "1-text-to-images")
    with Image.open(shot) as im:
        assert im.size[0] == 1280 and len(set(im.convert("L").getdata())) > 20
    if os.environ.get("MMDEMO_SCREENSHOT"):
        shutil.copy(shot, os.environ["MMDEMO_SCREENSHOT"])
    # clicking a result searches with it: the image tab opens, the clicked image first (itself)
    panel.locator(".thumbnail-item").nth(2).click()
    image_tab = page.get_by_role("tab", name="Image → images", exact=True)
    expect(image_tab).to_have_attribute("aria-selected", "true")
    panel = page.locator("[role=tabpanel]:visible").last
    again = _results(panel)
    assert again[0] == (1.0, found[2][1]), (again[0], found[2])
    expect(panel.locator("[data-testid=image] img")).to_have_count(1)


def test_image_search(page):
    panel = _open(page, "Retrieval", "Image → images")
    _upload(panel, SCENE / "scene_1.png")
    panel.get_by_role("button", name="Search").click()
    _results(panel)
    _shot(page, "2-image-to-images")


def test_caption_search_then_click_a_caption(page):
    panel = _open(page, "Retrieval", "Image → captions")
    _upload(panel, SCENE / "scene_2.png")
    panel.get_by_role("button", name="Search").click()
    rows = panel.locator("[role=row]:has([role=gridcell])")
    expect(rows).to_have_count(10)  # the tab's default number of results
    table = [r.locator("[role=gridcell]").all_inner_texts() for r in rows.all()]
    assert [int(r[0]) for r in table] == list(range(1, 11)), table
    assert all(r[2].strip() and r[3].isdigit() for r in table), table
    _shot(page, "3-image-to-captions")
    # clicking a caption searches with it: the text tab opens with that text and its results
    rows.nth(1).locator("[role=gridcell]").nth(2).click()
    expect(page.get_by_role("tab", name="Text → images", exact=True)).to_have_attribute(
        "aria-selected", "true")
    panel = page.locator("[role=tabpanel]:visible").last
    expect(panel.get_by_label("Description")).to_have_value(table[1][2].strip())
    _results(panel)


def test_image_plus_text_search(page):
    panel = _open(page, "Retrieval", "Image + text")
    _upload(panel, SCENE / "scene_3.png")
    panel.get_by_label("Text", exact=True).fill("a yellow star")
    panel.get_by_role("button", name="Search").click()
    _results(panel)
    _shot(page, "4-image-plus-text")


def test_add_search_and_remove_your_images(page, app, tmp_path):
    bundle = app[1]
    words = "a small green star below a large red circle"
    # the picture to add: the pixels of the image that best matches the words, so that the
    # added copy is certain to be among that search's results
    panel = _open(page, "Retrieval", "Text → images")
    panel.get_by_label("Description").fill(words)
    panel.get_by_role("button", name="Search").click()
    _results(panel)
    best = panel.locator(".thumbnail-item img").first.get_attribute("src").rsplit("/", 1)[1]
    with Image.open(bundle / "gallery" / best) as im:
        im.convert("RGB").save(tmp_path / "mine.png")
    (tmp_path / "mine.txt").write_text(words + "\n")
    other = Image.new("RGB", (96, 80), (40, 30, 60))
    ImageDraw.Draw(other).ellipse([20, 16, 70, 66], fill=(250, 200, 20))
    other.save(tmp_path / "other.png")
    (tmp_path / "bad.jpg").write_text("not a picture at all\n")
    files = [tmp_path / n for n in ("mine.png", "mine.txt", "other.png", "bad.jpg")]

    panel = _open(page, "Your images")
    panel.locator("input[type=file]").first.set_input_files([str(f) for f in files])
    expect(panel.locator("tr.file")).to_have_count(4)
    panel.get_by_role("button", name="Add to the gallery").click()
    report = panel.get_by_text(re.compile(r"Added \d+ image\(s\)"))
    expect(report).to_contain_text("Added 2 image(s)")
    expect(panel.get_by_text(re.compile(r"skipped bad\.jpg: .*not an image"))).to_have_count(1)
    expect(page.get_by_test_id("toast-text").filter(has_text="Skipped bad.jpg")).to_have_count(1)
    added = panel.locator(".thumbnail-item")
    expect(added).to_have_count(2)
    labels = added.locator(".caption-label").all_inner_texts()
    ids = {name: int(i) for i, name in (re.fullmatch(r"#(\d+) · (.+)", t).groups()
                                        for t in labels)}
    assert set(ids) == {"mine.png", "other.png"}, labels
    _shot(page, "5-your-images")

    # searchable at once: the words find the added copy, its caption the words from mine.txt
    panel = _open(page, "Retrieval", "Text → images")
    panel.get_by_label("Description").fill(words)
    panel.get_by_role("button", name="Search").click()
    _results(panel)
    mine = panel.locator(f".thumbnail-item:has(img[src$='/{ids['mine.png']}.png'])")
    expect(mine).to_have_count(1)
    expect(mine.locator(".caption-label")).to_have_text(re.compile(r" · " + re.escape(words)))
    assert words in page.locator("body").inner_text()
    _shot(page, "5-your-images-found")

    panel = _open(page, "Your images")
    panel.get_by_label("Gallery ids to remove").fill(str(ids["other.png"]))
    panel.get_by_role("button", name="Remove", exact=True).click()
    expect(panel.get_by_text(re.compile(r"Removed 1 item\(s\)"))).to_have_count(1)
    _shot(page, "5-your-images-removed")


def test_fused_classification_example(page, app):
    from training.data.shapes import ANSWERS

    panel = _open(page, "Fused classification")
    first = json.loads((app[1] / "manifest.json").read_text())["fusion"]["examples"][0]
    assert first["kind"] == "count_color"  # a class answer
    truth = panel.get_by_label("True answer (examples only)")
    expect(truth).to_have_value("")
    panel.locator("tr, .gallery-item").filter(has_text=first["text"]).first.click()
    expect(truth).to_have_value(f"{first['answer']} ({first['kind']})")
    expect(panel.get_by_label("Question")).to_have_value(first["text"])
    panel.get_by_role("button", name="Answer").click()
    expect(panel.get_by_text("The question asks for:")).to_be_visible()
    fused = panel.get_by_test_id("label").filter(has_text="Fused answer")
    fused = fused.locator(".output-class")
    expect(fused).to_have_count(1)
    # the page shows what the bundle's model answers, in the form its kind head asks for (a
    # tiny model may read a count question as one about position)
    from app import _answer_text
    from mmdemo.engine import CPU, Engine

    manifest = json.loads((app[1] / "manifest.json").read_text())
    engine = Engine.load(app[1], [CPU])
    ans = engine.classify(engine.gallery_image(first["image_id"]), first["text"],
                          manifest["fusion"]["default"])
    shown = fused.inner_text().strip()
    want = _answer_text(ans, ans.kind, manifest["fusion"]["task"])
    if isinstance(want, dict):  # a class: gr.Label shows the likeliest
        assert shown == max(want, key=want.get) and shown in ANSWERS, shown
    else:
        assert shown == want, shown
    _shot(page, "6-fused-classification")


def test_caption_and_draw(page):
    panel = _open(page, "Generation", "Caption an image")
    _upload(panel, SCENE / "scene_2.png")
    panel.get_by_role("button", name="Caption").click()
    expect(panel.get_by_label("Caption", exact=True)).not_to_have_value("")
    expect(panel.get_by_text("beam search, width 3")).to_be_visible()
    expect(panel.locator("[role=row]:has([role=gridcell])")).to_have_count(2)
    _shot(page, "8-caption")
    panel = _open(page, "Generation", "Draw from text")
    panel.get_by_label("Prompt").fill("a large red circle")
    panel.get_by_role("button", name="Draw").click()
    expect(panel.get_by_text("samples satisfy the prompt")).to_be_visible()
    expect(panel.locator(".thumbnail-item")).to_have_count(8)  # 4 samples, 4 nearest images
    expect(panel.locator("[role=row]:has([role=gridcell])")).to_have_count(4)
    _shot(page, "9-draw-from-text")


def test_about(page):
    panel = _open(page, "About")
    expect(panel.get_by_text("Execution provider")).to_be_visible()
    expect(panel).to_contain_text("CPUExecutionProvider")
    metrics = panel.locator("table").filter(has_text="t2i_R@10")
    expect(metrics).to_have_count(1)
    assert re.search(r"t2i_R@10\s+\d\.\d{3}", metrics.inner_text()), metrics.inner_text()
    _shot(page, "7-about")


def test_bad_upload_gets_a_message_then_search_works(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("these are notes, not a picture\n")
    panel = _open(page, "Retrieval", "Image → images")
    _upload(panel, bad)
    panel.get_by_role("button", name="Search").click()
    toast = page.locator(".toast-body.error").get_by_test_id("toast-text")
    expect(toast).to_have_count(1)
    message = toast.inner_text().strip()
    assert "not an image" in message and "Traceback" not in message, message
    assert message not in ("Error", "") and len(message) > 20, message
    _shot(page, "8-bad-upload")
    page.get_by_test_id("toast-close").click()
    _upload(panel, SCENE / "scene_4.png")
    panel.get_by_role("button", name="Search").click()
    _results(panel)
    expect(toast).to_have_count(0)
