"""The PyTorch networks behind a bundle's ONNX graphs, wrapped exactly as export wrote them, and
two reference networks of the sizes users know (ResNet-50 at 224 px, BERT-base): what
`python -m mmdemo.bench` compares ONNX Runtime against."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from export.onnx import ImageEncoderOnnx, TextEncoderOnnx, export_onnx
from training.train import load_run

REFERENCE_LENGTH = 32  # tokens per text for BERT-base, as in the published figures


def bundle_originals(work: Path, manifest: dict) -> dict[str, nn.Module]:
    """{role: module} for every model of the manifest that `work` holds the run of.

    `work` is laid out as `export.default.build_default_bundle` leaves it: run/ (the dual
    encoder), fusion/<method>/, captioner/, generator/. Roles whose run is missing are left out.
    """
    work = Path(work)
    model, _ = load_run(work / "run")
    out: dict[str, nn.Module] = {"image_encoder": ImageEncoderOnnx(model),
                                 "text_encoder": TextEncoderOnnx(model)}
    roles = manifest["models"]
    for role, info in roles.items():
        method_dir = work / "fusion" / str(info.get("method"))
        if role.startswith("fusion_") and method_dir.is_dir():
            from export.fusion import FusionOnnx
            from training.train_fusion import load_fusion

            out[role] = FusionOnnx(load_fusion(method_dir)[0])
    if "caption_start" in roles and (work / "captioner").is_dir():
        from export.captioner import CaptionStartOnnx, CaptionStepOnnx
        from training.train_captioner import load_captioner

        decoder, _ = load_captioner(work / "captioner")
        out["caption_start"] = CaptionStartOnnx(model.image_backbone, decoder)
        out["caption_step"] = CaptionStepOnnx(decoder)
    if "image_generator" in roles and (work / "generator").is_dir():
        from export.generator import GeneratorOnnx
        from training.train_generator import load_generator

        out["image_generator"] = GeneratorOnnx(load_generator(work / "generator")[0])
    return {k: v.eval() for k, v in out.items() if k in roles}


class _MeanPooledBert(nn.Module):
    """input_ids, attention_mask -> the mean of the last hidden states over the real tokens
    (how sentence encoders read BERT)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def reference_nets(folder: Path, size: str = "full") -> dict[str, dict]:
    """ResNet-50 (224 px) and BERT-base (12 layers, 768 wide, 32 tokens), randomly initialised
    (latency does not depend on the weights, and nothing is downloaded), exported to ONNX under
    `folder` like the bundle's encoders; size "small" gives ResNet-18 at 64 px and a 2-layer,
    128-wide BERT at 16 tokens instead (for tests). BERT's graph is also put through ONNX
    Runtime's transformer optimizer (fused attention, layer norms and GELU), the way BERT is
    served with it. {name: {"module", "onnx"
    (the graph to serve), "onnx_plain" (BERT before fusion), "inputs": {name: (shape without
    batch, dtype)}}}."""
    import torchvision
    from transformers import BertConfig, BertModel

    if size not in ("full", "small"):
        raise ValueError(f"size {size!r}; expected 'full' or 'small'")
    full = size == "full"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    px, length = (224, REFERENCE_LENGTH) if full else (64, 16)
    cnn_name, bert_name = ("resnet50_224", "bert_base") if full else ("resnet18_64", "bert_small")
    cnn = (torchvision.models.resnet50 if full else torchvision.models.resnet18)(weights=None)
    cfg = BertConfig(attn_implementation="eager") if full else BertConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
        attn_implementation="eager")
    # exported from the eager attention (its graph is the one ONNX Runtime's transformer
    # optimizer recognises); timed in PyTorch with its default, faster, fused attention
    bert = _MeanPooledBert(BertModel(cfg, add_pooling_layer=False))
    sdpa_cfg = BertConfig(**{**cfg.to_dict(), "attn_implementation": "sdpa"})
    bert_sdpa = _MeanPooledBert(BertModel(sdpa_cfg, add_pooling_layer=False))
    bert_sdpa.load_state_dict(bert.state_dict())
    nets = {}
    path = folder / f"{cnn_name}.onnx"
    if not path.is_file():
        export_onnx(cnn.eval(), (torch.randn(2, 3, px, px),), ["image"],
                    {"image": {0: "batch"}, "logits": {0: "batch"}}, path, ("logits",))
    nets[cnn_name] = {"module": cnn.eval(), "onnx": path,
                      "inputs": {"image": ((3, px, px), "float32")}}
    path = folder / f"{bert_name}.onnx"
    if not path.is_file():
        ids = torch.randint(1000, 2000, (2, length))
        export_onnx(bert.eval(), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"],
                    {"input_ids": {0: "batch", 1: "length"},
                     "attention_mask": {0: "batch", 1: "length"},
                     "embedding": {0: "batch"}}, path)
    fused = folder / f"{bert_name}.fused.onnx"
    if not fused.is_file():
        from onnxruntime.transformers.optimizer import optimize_model

        optimize_model(str(path), "bert", num_heads=cfg.num_attention_heads,
                       hidden_size=cfg.hidden_size).save_model_to_file(str(fused))
    nets[bert_name] = {"module": bert_sdpa.eval(), "onnx": fused, "onnx_plain": path,
                       "inputs": {"input_ids": ((length,), "int64"),
                                  "attention_mask": ((length,), "int64")}}
    return nets
