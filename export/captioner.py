"""Export the caption decoder into a bundle: a start graph (image -> state) and a step graph
(token, state -> log-probabilities, state), checked against PyTorch over several steps with the
carried state, then scored on the bundle's split through ONNX Runtime and mmdemo.decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from export.onnx import OPSET, ExportError, export_onnx, io_spec
from mmdemo.decoding import Captioner
from mmdemo.engine import open_session
from mmdemo.text import TextTokenizer
from training.captioner import CaptionDecoder
from training.data.coco import CaptionSet
from training.train_captioner import load_captioner

MAX_ABS_DIFF = 1e-4  # ORT vs PyTorch, log-probabilities and hidden state, every step
PARITY_STEPS = 6  # steps compared, each fed the previous step's state
EVAL_WIDTH = 3  # beam width of the scored captions


class CaptionStartOnnx(nn.Module):
    """image float32 (N, 3, S, S) -> memory float32 (N, M, H), hidden float32 (N, H)."""

    def __init__(self, backbone: nn.Module, decoder: CaptionDecoder):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.start(self.backbone.forward_features(image))


class CaptionStepOnnx(nn.Module):
    """token int64 (N,), hidden (N, H), memory (N, M, H) -> logprobs float32 (N, V),
    hidden_out (N, H), attention (N, M)."""

    def __init__(self, decoder: CaptionDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, token: torch.Tensor, hidden: torch.Tensor, memory: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, h, w = self.decoder.step(token, hidden, memory)
        return logits.log_softmax(-1), h, w


def parity(start: CaptionStartOnnx, step: CaptionStepOnnx, cap: Captioner,
           images: np.ndarray, steps: int = PARITY_STEPS) -> float:
    """Both graphs against PyTorch on a batch of 3 (traced at 2), `steps` steps, each side fed
    its own state and the same tokens (PyTorch's greedy choice). Returns the worst abs diff."""
    x = images[:3]
    with torch.no_grad():
        memory, hidden = start(torch.from_numpy(x))
        state = cap.start(x)
        worst = max(float(np.abs(memory.numpy() - state["memory"]).max()),
                    float(np.abs(hidden.numpy() - state["hidden"]).max()))
        tok = torch.full((len(x),), cap.bos, dtype=torch.long)
        for t in range(steps):
            logp, hidden, _ = step(tok, hidden, memory)
            got, state = cap.step(tok.numpy(), state)
            worst = max(worst, float(np.abs(logp.numpy() - got).max()),
                        float(np.abs(hidden.numpy() - state["hidden"]).max()))
            if worst > MAX_ABS_DIFF:
                raise ExportError(f"caption step {t + 1}: ONNX Runtime differs from PyTorch by "
                                  f"{worst:.2e} (limit {MAX_ABS_DIFF:.0e})")
            tok = logp.argmax(1)
    return worst


def caption_metrics(cap: Captioner, tok: TextTokenizer, images: np.ndarray, gal: CaptionSet,
                    raw_images: list | None = None, width: int = EVAL_WIDTH) -> dict:
    """Captions of every image by greedy decoding and by beam search, scored against the
    references (BLEU-4, CIDEr-D) and, given the raw images, against what the oracle sees in
    each (attribute precision and recall). images: float32 (N, 3, S, S), in gal's order."""
    from training.caption_metrics import caption_scores

    refs = {i: [c[1] for c in caps] for i, caps in enumerate(gal.captions)}
    out, samples = {}, {}
    scenes = None
    if raw_images is not None:
        from mmdemo.oracle import parse_scene

        scenes = [parse_scene(im) for im in raw_images]
    for method in ("greedy", "beam"):
        hyps = []
        for s in range(0, len(images), 256):
            hyps += cap.decode(images[s: s + 256], method, width=width)
        texts = tok.decode([h.tokens for h in hyps])
        m = caption_scores(dict(enumerate(texts)), refs)
        if scenes is not None:
            from mmdemo.oracle import attribute_scores

            m.update(attribute_scores(texts, scenes))
        out[method if method == "greedy" else f"beam{width}"] = {k: float(v)
                                                                 for k, v in m.items()}
        samples[method] = texts[:5]
    out["examples"] = samples
    return out


def export_captioner(cap_dir: Path, tmp: Path, spine: nn.Module, images: np.ndarray,
                     gal: CaptionSet, tok: TextTokenizer, raw_images: list | None = None
                     ) -> dict:
    """Write caption_start.onnx and caption_step.onnx into the bundle folder `tmp`; returns
    {"models": manifest entries, "captioning": settings, "metrics": scores on gal}. spine: the
    run's dual encoder (its image backbone is the decoder's); images: gal's images,
    preprocessed, float32 (N, 3, S, S)."""
    decoder, meta = load_captioner(cap_dir)
    start = CaptionStartOnnx(spine.image_backbone, decoder).eval()
    step = CaptionStepOnnx(decoder).eval()
    x2 = torch.from_numpy(images[:2])
    with torch.no_grad():
        memory, hidden = start(x2)
    export_onnx(start, (x2,), ["image"], {"image": {0: "batch"}, "memory": {0: "batch"},
                                         "hidden": {0: "batch"}},
                tmp / "caption_start.onnx", ("memory", "hidden"))
    ids = meta["special"]
    tok2 = torch.full((2,), ids["bos_id"], dtype=torch.long)
    export_onnx(step, (tok2, hidden, memory), ["token", "hidden", "memory"],
                {"token": {0: "batch"}, "hidden": {0: "batch"}, "memory": {0: "batch"},
                 "logprobs": {0: "batch"}, "hidden_out": {0: "batch"},
                 "attention": {0: "batch"}},
                tmp / "caption_step.onnx", ("logprobs", "hidden_out", "attention"))
    cap = Captioner(open_session(tmp / "caption_start.onnx"),
                    open_session(tmp / "caption_step.onnx"), ids["bos_id"], ids["eos_id"],
                    meta["max_length"])
    diff = parity(start, step, cap, images)
    print(f"caption decoder: parity {diff:.1e} over {PARITY_STEPS} steps; scoring ...",
          flush=True)
    metrics = caption_metrics(cap, tok, images, gal, raw_images)
    metrics["parity_max_abs_diff"] = diff
    metrics["val_last_epoch"] = meta.get("metrics", {})
    return {"models": {name: {"file": f"{name}.onnx", "opset": OPSET,
                              **io_spec(tmp / f"{name}.onnx")}
                       for name in ("caption_start", "caption_step")},
            "captioning": {**ids, "max_length": meta["max_length"],
                           "grid": list(meta["model"]["grid"]),
                           "epochs": meta["epoch"], "config": meta["captioner_config"]},
            "metrics": metrics}
