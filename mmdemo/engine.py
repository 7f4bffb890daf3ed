"""Engine: load a bundle once, then answer many queries with ONNX Runtime and hnswlib."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from mmdemo import settings, store
from mmdemo.bundle import MANIFEST, BundleError, read_manifest
from mmdemo.index import VectorIndex
from mmdemo.preprocess import PreprocessSpec, preprocess, to_pil
from mmdemo.text import TextTokenizer, clean_text

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
MAX_K = 1000  # the most results one query returns


_cuda_failed = False  # set once CUDA was asked for and did not load: stop asking

# CPU features that decide the kernels and data layouts ONNX Runtime's level-ALL optimisations
# write into a graph (NCHWc blocks are 8 floats wide with AVX2, 16 with AVX-512): a graph
# optimised offline is used only on a CPU with the same ones and the same ONNX Runtime.
CPU_FLAGS = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "neon", "asimd")


def session_options(level: ort.GraphOptimizationLevel | None = None) -> ort.SessionOptions:
    """Options every session of the app shares: mmdemo.settings' thread count, nodes run in
    order (graphs this sequential gain nothing from inter-op threads)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.ORT_THREADS
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if level is not None:
        opts.graph_optimization_level = level
    return opts


def cpu_fingerprint() -> dict:
    """What an offline-optimised graph depends on: ONNX Runtime's version and the CPU's
    features (from /proc/cpuinfo; empty where it cannot be read)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"onnxruntime": ort.__version__, "machine": platform.machine(),
            "cpu_flags": sorted(f for f in CPU_FLAGS if f in flags)}


def optimize_for_cpu(src: Path, dst: Path) -> dict:
    """Apply ONNX Runtime's level-ALL graph optimisations for the CPU once and save the result
    at dst, so that a session opens it with none to do; returns the manifest entry."""
    opts = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    opts.optimized_model_filepath = str(dst)
    ort.set_default_logger_severity(3)  # its warning that the file suits this CPU only: see above
    try:
        ort.InferenceSession(str(src), sess_options=opts, providers=[CPU])
    finally:
        ort.set_default_logger_severity(2)
    return {"file": dst.name, "level": "all", **cpu_fingerprint()}


def open_session(path: Path, providers: list[str] | None = None,
                 cpu_optimized: Path | None = None) -> ort.InferenceSession:
    """An ORT session on CUDA where that provider is present and actually loads, else CPU;
    on the CPU, `cpu_optimized` (a graph optimize_for_cpu wrote) is opened instead of `path`
    where given, with no optimisation left to do.

    onnxruntime-gpu lists CUDA even on machines with no GPU and then falls back to CPU, logging
    errors; the first attempt is made quietly and its outcome read back with `get_providers()`.
    """
    global _cuda_failed
    if providers is None:
        want_cuda = CUDA in ort.get_available_providers() and not _cuda_failed
        providers = [CUDA, CPU] if want_cuda else [CPU]
    if CUDA in providers:
        ort.set_default_logger_severity(4)  # the fallback on a GPU-less machine is not news
        try:
            sess = ort.InferenceSession(str(path), sess_options=session_options(),
                                        providers=providers)
        finally:
            ort.set_default_logger_severity(2)
        if CUDA not in sess.get_providers():
            _cuda_failed = True
        return sess
    if cpu_optimized is not None:
        return ort.InferenceSession(str(cpu_optimized), providers=providers,
                                    sess_options=session_options(
                                        ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
    return ort.InferenceSession(str(path), sess_options=session_options(), providers=providers)


def _load_store(root: Path, manifest: dict
                ) -> tuple[dict[str, VectorIndex], dict[int, dict], dict[int, tuple[str, int]]]:
    """The indexes, the gallery by id and the captions by id, checked against each other: each
    index holds exactly the ids of the gallery's images (or captions)."""
    files = manifest["files"]
    indexes = {}
    for name, info in manifest["indexes"].items():
        indexes[name] = VectorIndex.load(root / info["file"], encoder_sha256=files[
            manifest["models"][info["encoder"]]["file"]])
    gal = json.loads((root / manifest["gallery"]["file"]).read_text())
    gallery = {int(it["id"]): it for it in gal["items"]}
    captions = {int(cid): (text, int(it["id"])) for it in gal["items"]
                for cid, text in zip(it["caption_ids"], it["captions"])}
    for name, idx in indexes.items():
        want = set(gallery) if name == "images" else set(captions)
        have = idx.live_ids()
        if have != want:
            what = "images" if name == "images" else "captions"
            raise BundleError(
                f"{root}: index {name} holds {len(have)} items and the gallery {len(want)} "
                f"{what} ({len(want - have)} not indexed, {len(have - want)} not in the "
                f"gallery); the bundle's parts disagree. Restore it with `python -m "
                f"mmdemo.index repair --bundle {root}`")
    return indexes, gallery, captions


def _stamp(root: Path) -> tuple[int, int, int] | None:
    """What changes whenever a writer publishes a new manifest (it is replaced by rename)."""
    try:
        st = os.stat(root / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _check_k(k) -> int:
    if (isinstance(k, bool) or not isinstance(k, (int, np.integer, float, np.floating))
            or not float(k).is_integer()):
        raise ValueError(f"k is {k!r}; expected a whole number of results")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k is {int(k)}; ask for between 1 and {MAX_K} results")
    return int(k)


@dataclass
class ImageHit:
    id: int
    score: float
    image: str  # path of the gallery thumbnail
    captions: list[str]


@dataclass
class CaptionHit:
    id: int
    score: float
    text: str
    image_id: int


@dataclass
class GeneratedCaption:
    text: str
    logprob: float  # sum of the tokens' log-probabilities
    tokens: int  # words and pieces, without the start and end tokens
    finished: bool  # False where it ran into the maximum length
    nearest: list[CaptionHit]  # the gallery captions retrieval ranks first for the image


@dataclass
class GeneratedImage:
    image: np.ndarray  # uint8 (H, W, 3)
    seed: int  # the sample's own seed: generate_image(prompt, 1, seed) draws it again
    reading: list[dict]  # the oracle's objects (shape, color, size, x, y)
    satisfies: bool | None  # the oracle's verdict on the prompt; None where it cannot read it
    score: float  # cosine of the sample and the prompt in the joint space
    nearest: ImageHit | None  # the closest real gallery image (a memorisation check)


@dataclass
class Answer:
    """One fusion model's reading of an image and a text."""

    method: str
    kind: str | None  # what the text asks, by the kind head; None where the model reads no text
    labels: dict[str, float]  # the top-k classes and their probabilities
    values: dict[str, float]  # every regression output by name (e.g. x, y, area)
    attention: np.ndarray | None  # float32 (h, w) summing to 1, cross_attention only


class Engine:
    """The one object the app talks to. Build with `Engine.load(bundle_dir)`."""

    def __init__(self, root: Path, manifest: dict, sessions: dict[str, ort.InferenceSession],
                 tokenizer: TextTokenizer, spec: PreprocessSpec, indexes: dict[str, VectorIndex],
                 gallery: dict[int, dict], captions: dict[int, tuple[str, int]]):
        self.root, self.manifest, self.sessions = root, manifest, sessions
        self.tokenizer, self.spec, self.indexes = tokenizer, spec, indexes
        self.gallery, self.captions = gallery, captions
        self.write_lock = threading.RLock()  # adding or removing images (mmdemo.store)
        self.notes: list[str] = []  # what the About tab should say about how the models run
        self._stamp = _stamp(root)  # of the manifest this engine's gallery and indexes are

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, root: Path | str, providers: list[str] | None = None,
             gallery: bool = True) -> Engine:
        """Check the bundle's format and hashes, open its sessions and indexes.

        `gallery=False` opens the models only, with an empty gallery and no indexes, and does not
        check their files (for `mmdemo.store.repair`)."""
        root = Path(root)
        with store.bundle_lock(root, exclusive=False):  # no writer sweeps files meanwhile
            manifest = read_manifest(root, store=gallery)
            stamp = _stamp(root)
            parts = _load_store(root, manifest) if gallery else ({}, {}, {})
        sessions, notes = {}, []
        here, stale = cpu_fingerprint(), set()
        for role, info in manifest["models"].items():
            opt = info.get("cpu_optimized")
            if opt and {k: opt.get(k) for k in here} != here:
                stale.add(role)
                opt = None
            sessions[role] = open_session(root / info["file"], providers,
                                          root / opt["file"] if opt else None)
        if CUDA in ort.get_available_providers() and _cuda_failed and providers is None:
            notes.append("ONNX Runtime has the CUDA provider, but it did not load here (no "
                         "usable GPU, driver or CUDA libraries): every model runs on the CPU.")
        if stale:
            notes.append(f"{len(stale)} graphs were optimised offline on another CPU or ONNX "
                         "Runtime version: they are optimised again as they load.")
        tok = manifest["tokenizer"]
        tokenizer = TextTokenizer.from_file(root / tok["file"], tok["max_length"],
                                            tok["pad_token"])
        spec = PreprocessSpec.from_dict(manifest["preprocess"])
        engine = cls(root, manifest, sessions, tokenizer, spec, *parts)
        engine.notes, engine._stamp = notes, stamp
        return engine

    def reload(self, lock: bool = True) -> None:
        """Read the gallery and indexes again, as the bundle's manifest names them now (another
        process added or removed images, or a change failed). `lock=False`: the caller holds
        the bundle's lock already."""
        with store.bundle_lock(self.root, exclusive=False) if lock else contextlib.nullcontext():
            stamp = _stamp(self.root)
            manifest = read_manifest(self.root, known=self.manifest.get("files"))
            indexes, gallery, captions = _load_store(self.root, manifest)
        # one assignment: a search reads either the old state or the new one
        self.manifest, self.indexes, self.gallery, self.captions, self._stamp = (
            manifest, indexes, gallery, captions, stamp)

    def published(self, manifest: dict) -> None:
        """This engine wrote `manifest` (mmdemo.store): its state is the bundle's own."""
        self.manifest, self._stamp = manifest, _stamp(self.root)

    def refresh(self) -> bool:
        """Reload if another process (the CLI, a second app) changed the bundle since this
        engine read it: one stat of the manifest per call. Skipped while this process is
        writing (the writer reloads first anyway). Returns whether it reloaded."""
        if _stamp(self.root) == self._stamp or not self.write_lock.acquire(blocking=False):
            return False
        try:
            if _stamp(self.root) == self._stamp:
                return False
            self.reload()
            return True
        finally:
            self.write_lock.release()

    @property
    def providers(self) -> dict[str, str]:
        """The execution provider each model runs on, as ORT reports it."""
        return {role: s.get_providers()[0] for role, s in self.sessions.items()}

    @property
    def provider(self) -> str:
        return sorted(set(self.providers.values()))[0]

    # ------------------------------------------------------------------ encoders

    def encode_images(self, images: list) -> np.ndarray:
        """float32 (N, D), L2-normalised, from PIL images or uint8 arrays."""
        if not images:
            raise ValueError("no images given")
        return self.encode_preprocessed(preprocess(images, self.spec))

    def encode_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S) from `mmdemo.preprocess.preprocess` -> float32 (N, D),
        L2-normalised."""
        return self.sessions["image_encoder"].run(None, {"image": x})[0]

    def read_text(self, text: str) -> tuple[str, list[str]]:
        """The text as the model reads it, and notices of what it drops or does not know:
        control characters, text past the model's length, words outside its vocabulary.
        Empty text is a ValueError."""
        clean, notices = clean_text(text)
        return clean, notices + self.tokenizer.notices(clean)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """float32 (N, D), L2-normalised."""
        if not texts:
            raise ValueError("no texts given")
        texts = [clean_text(t)[0] for t in texts]
        ids, mask = self.tokenizer(texts)
        return self.sessions["text_encoder"].run(None, {"input_ids": ids,
                                                        "attention_mask": mask})[0]

    # ------------------------------------------------------------------ search

    def _image_hits(self, q: np.ndarray, k: int) -> list[ImageHit]:
        self.refresh()
        ids, scores = self.indexes["images"].search(q, _check_k(k))
        hits = []
        for i, s in zip(ids[0], scores[0]):
            item = self.gallery.get(int(i))
            if item is not None:  # None: removed while this search ran
                hits.append(ImageHit(int(i), float(s), str(self.root / item["file"]),
                                     item["captions"]))
        return hits

    def search_by_text(self, text: str, k: int = 10) -> list[ImageHit]:
        """Gallery images that best match a text."""
        return self._image_hits(self.encode_texts([text]), k)

    def search_by_image(self, image, k: int = 10) -> list[ImageHit]:
        """Gallery images closest to an image."""
        return self._image_hits(self.encode_images([image]), k)

    def search_captions(self, image, k: int = 10) -> list[CaptionHit]:
        """Gallery captions that best describe an image."""
        self.refresh()
        ids, scores = self.indexes["captions"].search(self.encode_images([image]), _check_k(k))
        return [CaptionHit(int(i), float(s), *self.captions[int(i)])
                for i, s in zip(ids[0], scores[0]) if int(i) in self.captions]

    def search_composed(self, image, text: str, alpha: float = 0.5, k: int = 10
                        ) -> list[ImageHit]:
        """Images matching z = alpha * f_img(image) + (1 - alpha) * f_txt(text), renormalised."""
        if not 0.0 <= alpha <= 1.0:  # NaN too
            raise ValueError(f"alpha is {alpha}; expected a weight in [0, 1]")
        z = alpha * self.encode_images([image]) + (1.0 - alpha) * self.encode_texts([text])
        z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
        return self._image_hits(z, k)

    # ------------------------------------------------------------------ your own images

    def add_images(self, images: list, captions: list[list[str]] | None = None,
                   names: list[str] | None = None, progress=None,
                   limits: store.Limits | None = None):
        """Add images (file paths, bytes, PIL images or arrays), each with optional captions, to
        the gallery and both indexes; searchable at once and saved in the bundle. Returns
        `mmdemo.store.Added` (the new ids, and what was skipped and why). `progress(done,
        total)` is called after each batch."""
        uploads, skipped = [], []
        for n, img in enumerate(images):
            caps = list(captions[n]) if captions else []
            if isinstance(img, (str, Path)):
                name = names[n] if names else Path(img).name
                if not Path(img).is_file():
                    skipped.append((name, "no such file"))
                    continue
                data = Path(img).read_bytes()
            elif isinstance(img, (bytes, bytearray)):
                name, data = names[n] if names else f"image {n + 1}", bytes(img)
            else:
                buf = io.BytesIO()
                to_pil(img).save(buf, "PNG")
                name, data = names[n] if names else f"image {n + 1}", buf.getvalue()
            uploads.append(store.Upload(name, data, caps))
        added = store.add(self, uploads, progress, limits=limits)
        added.skipped = skipped + added.skipped
        return added

    def remove_images(self, ids: list[int], owned: set[int] | None = None,
                      shipped: bool = False) -> list[int]:
        """Take gallery items out of the indexes and the gallery; saved in the bundle. Only
        images users added, unless `shipped`; only those in `owned`, where given (see
        `mmdemo.store.remove`)."""
        return store.remove(self, ids, owned=owned, shipped=shipped)

    def gallery_image(self, item_id: int) -> Image.Image:
        self.refresh()
        if item_id not in self.gallery:
            raise KeyError(f"no gallery item with id {item_id}")
        return Image.open(self.root / self.gallery[item_id]["file"]).convert("RGB")

    # ------------------------------------------------------------------ generation

    @property
    def captioning(self) -> dict:
        """The bundle's caption decoder settings; {} if it has none."""
        return self.manifest.get("captioning", {})

    @property
    def generator(self) -> dict:
        """The bundle's image generator settings; {} if it has none."""
        return self.manifest.get("generator", {})

    def caption(self, image, method: str = "beam", width: int = 3, top_p: float = 0.9,
                temperature: float = 1.0, max_length: int | None = None,
                seed: int | None = None) -> GeneratedCaption:
        """Describe an image with the caption decoder: greedy, beam search of `width`, or
        nucleus sampling (top_p, temperature, seed)."""
        if not self.captioning:
            raise ValueError("this bundle has no caption decoder; export it with "
                             "`python -m export RUN BUNDLE --captioner CAPTIONER_RUN`")
        from mmdemo.decoding import Captioner

        if not (isinstance(width, (int, np.integer)) or float(width).is_integer()) \
                or not 1 <= width <= 16:
            raise ValueError(f"beam width is {width}; expected 1 to 16")
        c = self.captioning
        cap = Captioner(self.sessions["caption_start"], self.sessions["caption_step"],
                        c["bos_id"], c["eos_id"], c["max_length"])
        x = preprocess([image], self.spec)
        hyp = cap.decode(x, method, int(width), top_p, temperature, max_length, seed=seed)[0]
        text = self.tokenizer.decode([hyp.tokens])[0]
        self.refresh()
        ids, scores = self.indexes["captions"].search(self.encode_images([image]), 2)
        nearest = [CaptionHit(int(i), float(s), *self.captions[int(i)])
                   for i, s in zip(ids[0], scores[0]) if int(i) in self.captions]
        return GeneratedCaption(text, hyp.logprob, len(hyp.tokens), hyp.finished, nearest)

    def generate_image(self, prompt: str, n: int = 4, seed: int | None = None,
                       temperature: float = 1.0, progress=None) -> list[GeneratedImage]:
        """Draw n images from a text with the generator: z ~ N(0, temperature^2) from `seed`
        (sample i uses seed + i), decoded with the prompt's embedding; each sample read by the
        oracle, scored against the prompt and matched to its nearest gallery image.
        `progress(done, n)` is called after each sample."""
        if not self.generator:
            raise ValueError("this bundle has no image generator; export it with "
                             "`python -m export RUN BUNDLE --generator GENERATOR_RUN`")
        from mmdemo.oracle import parse_scene, read_caption, satisfies

        if isinstance(n, bool) or not float(n).is_integer() or not 1 <= n <= 16:
            raise ValueError(f"number of samples is {n}; expected 1 to 16")
        if not 0.0 <= temperature <= 3.0:  # NaN too
            raise ValueError(f"temperature is {temperature}; expected 0 to 3")
        seed = int(np.random.default_rng().integers(2**31 - 1)) if seed is None else int(seed)
        if not 0 <= seed < 2**31:
            raise ValueError(f"seed is {seed}; expected 0 to {2**31 - 1}")
        text = clean_text(prompt)[0]
        emb = self.encode_texts([text])
        claim = read_caption(text) if self.generator.get("oracle") else None
        sess, zdim = self.sessions["image_generator"], int(self.generator["latent_dim"])
        out = []
        for i in range(int(n)):
            z = np.random.default_rng(seed + i).standard_normal((1, zdim)).astype(np.float32)
            x = sess.run(["image"], {"text_embedding": emb, "z": z * np.float32(temperature)})[0]
            img = (np.clip(x[0].transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            q = self.encode_images([img])
            reading = parse_scene(img) if self.generator.get("oracle") else []
            ok = satisfies(reading, claim) if claim and claim.get("mentions") else None
            hits = self._image_hits(q, 1)
            out.append(GeneratedImage(img, seed + i, reading, ok, float((q @ emb.T)[0, 0]),
                                      hits[0] if hits else None))
            if progress is not None:
                progress(i + 1, int(n))
        return out

    # ------------------------------------------------------------------ fusion

    @property
    def fusion(self) -> dict:
        """The bundle's fusion section (methods, default, task, examples); {} if none."""
        return self.manifest.get("fusion", {})

    def classify(self, image, text: str, method: str | None = None, a: float = 0.5,
                 k: int = 5) -> Answer:
        """Answer a question (or classify a caption) about an image with one fusion model.

        `method` is one of self.fusion["methods"] (default: the bundle's best); `a` weighs the
        image in weighted_sum (1 ignores the text, 0 the image). Probabilities are a softmax
        over the classes, or per-class sigmoids for a multi-label task.
        """
        if not self.fusion:
            raise ValueError("this bundle has no fusion models; export it with "
                             "`python -m export RUN BUNDLE --fusion FUSION_RUN`")
        method = method or self.fusion["default"]
        if method not in self.fusion["methods"]:
            raise ValueError(f"fusion method {method!r}; this bundle has "
                             f"{self.fusion['methods']}")
        if not 0.0 <= a <= 1.0:  # NaN too
            raise ValueError(f"a is {a}; expected a weight in [0, 1]")
        k = _check_k(k)
        role = f"fusion_{method}"
        sess = self.sessions[role]
        wanted = {i.name for i in sess.get_inputs()}
        feed = {}
        if "image" in wanted:
            feed["image"] = preprocess([image], self.spec)
        if "input_ids" in wanted:
            if text is None or not " ".join(str(text).split()):
                raise ValueError("empty question; type one such as 'what color is the square?'")
            text = clean_text(text)[0]
            feed["input_ids"], feed["attention_mask"] = self.tokenizer([text])
        if "a" in wanted:
            feed["a"] = np.array([a], dtype=np.float32)
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, (v[0] for v in sess.run(names, feed))))
        task = self.fusion["task"]
        logits = out["logits"].astype(np.float64)
        if task["multilabel"]:
            probs = 1.0 / (1.0 + np.exp(-logits))
        else:
            e = np.exp(logits - logits.max())
            probs = e / e.sum()
        top = np.argsort(-probs)[:k]
        kind = None
        if "input_ids" in wanted:
            kind = task["kinds"][int(np.argmax(out["kinds"]))]
        return Answer(method=method, kind=kind,
                      labels={task["classes"][i]: float(probs[i]) for i in top},
                      values={n: float(v) for n, v in zip(task["values"], out["values"])},
                      attention=out.get("attention"))
