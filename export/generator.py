"""Export the text-to-image generator into a bundle: image_generator.onnx, checked against
PyTorch at a batch size other than the traced one, and measured on the bundle's split through
ONNX Runtime.

Two measures, both from one seeded draw of z ~ N(0, 1) * temperature per prompt:
- the oracle's verdict: the share of drawn scenes that satisfy their prompt (the shapes world's
  `mmdemo.oracle.parse_scene` reads the picture, `satisfies` checks the caption's claim), for
  prompts that mention one object and prompts that mention two (with their relation, if any);
- R-precision by AttnGAN's protocol: each drawn image, embedded by the bundle's image encoder,
  ranks its prompt among CANDIDATES captions (the prompt and captions of other images, by
  cosine with their text embeddings); the share ranked first.

R-precision is also measured on the prompts' real images (`r_precision_real_images`: what the
encoders allow). It is not an independent judge of a generator trained with MatchLoss, which
optimises that same joint space; the oracle is.

`generation_metrics` takes the generator and the encoders as numpy callables, so the numbers can
be recomputed from any implementation (the Engine's sessions, PyTorch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from export.onnx import OPSET, ExportError, export_onnx, io_spec
from mmdemo.bundle import sha256_file
from mmdemo.engine import open_session
from mmdemo.preprocess import PreprocessSpec, preprocess
from training.data.coco import CaptionSet
from training.generator import ConditionalVAE
from training.train_generator import load_generator

INPUTS = ["text_embedding", "z"]
OUTPUT = "image"
TRACE_BATCH, CHECK_BATCH = 2, 5  # parity runs at a batch size the graph was not traced at
MAX_ABS_DIFF = 1e-4  # ORT vs PyTorch, per pixel value in [0, 1]
CANDIDATES = 100  # R-precision: the prompt among this many captions
SEED = 0  # z and the R-precision candidates
TEMPERATURE = 1.0  # z ~ N(0, 1) * TEMPERATURE

Generate = Callable[[np.ndarray, np.ndarray], np.ndarray]
EncodeImage = Callable[[np.ndarray], np.ndarray]
EncodeText = Callable[[list[str]], np.ndarray]


class GeneratorOnnx(nn.Module):
    """text_embedding float32 (N, T) (the text encoder's, L2-normalised), z float32 (N, Z)
    (standard normal times a temperature) -> image float32 (N, 3, S, S) in [0, 1]."""

    def __init__(self, model: ConditionalVAE):
        super().__init__()
        self.model = model

    def forward(self, text_embedding: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.model.generate(text_embedding, z)


def fix_output_shape(path: Path, dims: list[int]) -> None:
    """Write the image output's fixed axes (3, S, S) into the graph, where the exporter left
    names of its own, so the manifest's io_spec reads (batch, 3, S, S)."""
    m = onnx.load(str(path))
    shape = m.graph.output[0].type.tensor_type.shape
    for d, v in zip(shape.dim[1:], dims):
        d.Clear()
        d.dim_value = v
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float32 (N, 3, S, S) in [0, 1] -> uint8 (N, S, S, 3), rounded as the Engine shows them."""
    return (np.clip(images.transpose(0, 2, 3, 1), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def r_precision(image_emb: np.ndarray, text_emb: np.ndarray, candidates: np.ndarray) -> float:
    """Share of rows whose own caption scores above every other candidate.

    image_emb float32 (P, D) and text_emb float32 (U, D), L2-normalised; candidates int64
    (P, C) rows into text_emb, the true caption first. A tie counts as a miss.
    """
    hits = 0
    for s in range(0, len(image_emb), 512):
        cand = text_emb[candidates[s: s + 512]]  # (b, C, D)
        sims = np.einsum("bcd,bd->bc", cand, image_emb[s: s + 512])
        hits += int((sims[:, 0] > sims[:, 1:].max(1)).sum())
    return hits / len(image_emb)


def draw_candidates(prompt_image: np.ndarray, prompt_text: np.ndarray, n: int,
                    rng: np.random.Generator) -> np.ndarray:
    """int64 (P, n): for each prompt its own text row, then n - 1 rows of captions drawn at
    random from other images' captions whose text differs from the prompt's (an identical
    caption of another scene would tie with it). prompt_image (P,) and prompt_text (P,): each
    prompt's image and its row in the table of distinct texts."""
    out = np.empty((len(prompt_image), n), dtype=np.int64)
    for p in range(len(prompt_image)):
        picked: list[int] = []
        for _ in range(100):
            if len(picked) == n - 1:
                break
            draw = rng.integers(0, len(prompt_image), 2 * n)
            ok = draw[(prompt_image[draw] != prompt_image[p])
                      & (prompt_text[draw] != prompt_text[p])]
            picked += list(prompt_text[ok[: n - 1 - len(picked)]])
        if len(picked) < n - 1:
            raise ValueError(f"prompt {p} has too few captions of other images in other words "
                             f"to draw {n - 1} candidates from")
        out[p, 0], out[p, 1:] = prompt_text[p], picked
    return out


def generation_metrics(generate: Generate, encode_image: EncodeImage, encode_text: EncodeText,
                       data: CaptionSet, spec: PreprocessSpec, latent_dim: int,
                       seed: int = SEED, temperature: float = TEMPERATURE,
                       candidates: int = CANDIDATES, limit: int | None = None,
                       bs: int = 256) -> dict:
    """The generator's measures on every caption of `data` (the first `limit` with a limit).

    generate(text_embedding float32 (N, T), z float32 (N, Z)) -> float32 (N, 3, S, S) in
    [0, 1]; encode_image(float32 (N, 3, s, s), preprocessed by `spec`) and encode_text(texts)
    -> float32 (N, D), L2-normalised. z is one draw of N(0, 1) * temperature from `seed`, prompt
    by prompt in caption order; drawn images are rounded to uint8 (as the Engine shows them)
    before the oracle reads them and the image encoder embeds them.
    """
    prompts = [(i, text, claim) for i, caps in enumerate(data.captions)
               for _, text, claim in caps][:limit]
    texts = sorted({t for _, t, _ in prompts})
    row = {t: k for k, t in enumerate(texts)}
    prompt_image = np.array([i for i, _, _ in prompts], dtype=np.int64)
    prompt_text = np.array([row[t] for _, t, _ in prompts], dtype=np.int64)
    if len(set(prompt_image.tolist())) < 2:
        raise ValueError("R-precision needs captions of at least two images")
    text_emb = np.concatenate([encode_text(texts[s: s + bs]) for s in range(0, len(texts), bs)])
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((len(prompts), latent_dim)) * temperature).astype(np.float32)
    cand = draw_candidates(prompt_image, prompt_text, candidates, rng)

    drawn = np.concatenate([to_uint8(generate(text_emb[prompt_text[s: s + bs]], z[s: s + bs]))
                            for s in range(0, len(prompts), bs)])  # (P, S, S, 3)
    image_emb = np.concatenate([encode_image(preprocess(list(drawn[s: s + bs]), spec))
                                for s in range(0, len(drawn), bs)])
    out = {"prompts": len(prompts), "seed": seed, "temperature": temperature,
           "r_precision": r_precision(image_emb, text_emb, cand),
           "r_precision_candidates": candidates}
    # the same protocol on the real images of the prompts: what the encoders allow
    shown = sorted(set(prompt_image.tolist()))
    paths = [data.paths()[i] for i in shown]
    real = np.concatenate([encode_image(preprocess(paths[s: s + bs], spec))
                           for s in range(0, len(paths), bs)])
    out["r_precision_real_images"] = r_precision(
        real[np.searchsorted(shown, prompt_image)], text_emb, cand)
    if all(c is not None for _, _, c in prompts):  # the shapes world: the oracle can judge
        from mmdemo.oracle import parse_scene, satisfies

        verdicts: dict[str, list[bool]] = {"single": [], "two": [], "two_relation": []}
        for (_, _, claim), img in zip(prompts, drawn):
            m = len(claim["mentions"])
            if m not in (1, 2):
                continue
            ok = bool(satisfies(parse_scene(img), claim))
            verdicts["single" if m == 1 else "two"].append(ok)
            if m == 2 and claim.get("relation"):
                verdicts["two_relation"].append(ok)
        for k, v in verdicts.items():
            out[f"satisfied_{k}"] = float(np.mean(v)) if v else None
            out[f"prompts_{k}"] = len(v)
    return out


def export_generator(gen_dir: Path, tmp: Path, data: CaptionSet, spec: PreprocessSpec,
                     encode_image: EncodeImage, encode_text: EncodeText,
                     run_dir: Path | None = None, seed: int = SEED,
                     temperature: float = TEMPERATURE, limit: int | None = None) -> dict:
    """Write image_generator.onnx (trained under gen_dir) into the bundle folder `tmp`, check
    it against PyTorch, and measure it on `data` through ONNX Runtime with the bundle's
    encoders (numpy callables, as in `generation_metrics`). With `run_dir`, refuse a generator
    trained on another run's text encoder. Returns {"models": manifest entries, "metrics":
    the measures and the parity check, "generation": the manifest's generation section}."""
    model, meta = load_generator(gen_dir)
    cfg = model.cfg
    if run_dir is not None:
        got = sha256_file(Path(run_dir) / "checkpoints" / "last" / "model.safetensors")
        want = meta["text_encoder"]["weights_sha256"]
        if got != want:
            raise ExportError(f"{gen_dir} was trained on the text encoder with weights "
                              f"{want[:12]}, but {run_dir} holds {got[:12]}: retrain it on this "
                              "run")
    texts = [t for caps in data.captions for _, t, _ in caps]
    sample = encode_text(texts[:CHECK_BATCH])
    if sample.shape[1] != cfg.text_dim:
        raise ExportError(f"the text encoder gives {sample.shape[1]}-d embeddings; the "
                          f"generator takes {cfg.text_dim}-d")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(CHECK_BATCH, cfg.latent_dim, generator=g)
    e = torch.from_numpy(sample)
    path = export_onnx(GeneratorOnnx(model), (e[:TRACE_BATCH], z[:TRACE_BATCH]), INPUTS,
                       {"text_embedding": {0: "batch"}, "z": {0: "batch"}, OUTPUT: {0: "batch"}},
                       tmp / "image_generator.onnx", (OUTPUT,))
    fix_output_shape(path, [3, cfg.image_size, cfg.image_size])
    sess = open_session(path)
    with torch.no_grad():
        ref = model.generate(e, z).numpy()
    got = sess.run([OUTPUT], {"text_embedding": sample, "z": z.numpy()})[0]
    diff = float(np.abs(ref - got).max())
    if got.shape != ref.shape or diff > MAX_ABS_DIFF:
        raise ExportError(f"image_generator: ONNX Runtime differs from PyTorch at batch "
                          f"{CHECK_BATCH}: shape {got.shape} vs {ref.shape}, max abs diff "
                          f"{diff:.2e} (limit {MAX_ABS_DIFF:.0e})")

    def generate(text_embedding: np.ndarray, zs: np.ndarray) -> np.ndarray:
        return sess.run([OUTPUT], {"text_embedding": text_embedding, "z": zs})[0]

    metrics = generation_metrics(generate, encode_image, encode_text, data, spec,
                                 cfg.latent_dim, seed, temperature, limit=limit)
    metrics["parity"] = {"max_abs_diff": diff, "batch": CHECK_BATCH}
    print(f"generator: parity {diff:.1e}, R-precision {metrics['r_precision']:.3f}"
          + (f", oracle satisfied single {metrics['satisfied_single']:.3f} / two "
             f"{metrics['satisfied_two']:.3f}" if metrics.get("satisfied_single") is not None
             else ""), flush=True)
    return {
        "models": {"image_generator": {"file": path.name, "opset": OPSET,
                                       "latent_dim": cfg.latent_dim, **io_spec(path)}},
        "metrics": metrics,
        "generation": {"latent_dim": cfg.latent_dim, "text_dim": cfg.text_dim,
                       "size": cfg.image_size, "temperature": temperature,
                       "oracle": "satisfied_single" in metrics,
                       "trained_epochs": meta["epoch"],
                       "generator_config": meta["generator_config"],
                       "examples": examples(data, 8)},
    }


def examples(data: CaptionSet, n: int) -> list[str]:
    """Distinct prompts for the app: one- and two-object captions in turn where the captions
    carry claims, else the first captions; spread over the split by a fixed hash."""
    caps = sorted({t: c for caps in data.captions for _, t, c in caps}.items(),
                  key=lambda tc: hashlib.sha256(tc[0].encode()).hexdigest())
    if all(c is not None for _, c in caps):
        ones = [t for t, c in caps if len(c["mentions"]) == 1]
        twos = [t for t, c in caps if len(c["mentions"]) == 2]
        picked = [t for pair in zip(ones, twos) for t in pair]
        return picked[:n]
    return [t for t, _ in caps[:n]]
