"""Fusion of an image and a text for classification and regression, on the spine's encoders.

Every model reads the image encoder's spatial map (cells) and the text encoder's token states,
and ends in the same heads: class logits, regression values, and a kind head that says which of
them answers the text (a class, a position, an area). The methods differ only in how the two
sides meet:

    image_only       z = f1(cells)                        (baseline: no text)
    text_only        z = f2(tokens)                       (baseline: no image)
    weighted_sum     z = a * f1(cells) + (1 - a) * f2(tokens), a in [0, 1] chosen at inference
    concat           z = MLP([f1(cells), f2(tokens)])
    cross_attention  the text's summary f2(tokens) attends over the cells (with 2-D positions),
                     layer after layer, so a question can hop ("the blue triangle", then "what
                     is left of it"); the last layer's attention weights are an output

Reads bottom-up: attention blocks, the two summaries, the model, then its builder.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ["image_only", "text_only", "weighted_sum", "concat", "cross_attention"]
FUSED = ["weighted_sum", "concat", "cross_attention"]


class CrossAttention(nn.Module):
    """Queries (B, L, d) attend over keys and values (B, M, d); also returns the weights
    (B, heads, L, M). Plain ops, so it exports to ONNX with dynamic batch and length."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, 1.0 / math.sqrt(dim // heads)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, index: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)  # (B, H, L, d/H)
        kv = _pick(self.kv(ctx), index)  # (B, M, 2d), computed once per distinct context
        k, v = kv.reshape(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, L, M)
        if key_mask is not None:  # padding is never looked at
            att = att.masked_fill(key_mask[:, None, None, :] == 0, -1e4)
        att = att.softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(y), att


class CrossBlock(nn.Module):
    """The query looks at the image cells, then thinks (pre-norm). Keys and values are computed
    once per distinct image; `index` (B,) picks each query's image."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_x, self.ln_c, self.ln_m = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, cells: torch.Tensor, index: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        y, att = self.cross(self.ln_x(x), self.ln_c(cells), index)
        x = x + y
        return x + self.mlp(self.ln_m(x)), att


class ImageSummary(nn.Module):
    """f1: cells (B, M, d) -> (B, d). The mean says what is there; the cells flattened after a
    narrow projection say where."""

    def __init__(self, dim: int, cells: int, narrow: int = 16):
        super().__init__()
        self.narrow = nn.Linear(dim, narrow)
        self.mlp = nn.Sequential(nn.Linear(dim + cells * narrow, 2 * dim), nn.GELU(),
                                 nn.Linear(2 * dim, dim))

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        where = self.narrow(cells).flatten(1)  # (B, M * narrow)
        return self.mlp(torch.cat([cells.mean(1), where], 1))


class TextSummary(nn.Module):
    """f2: tokens (B, L, d) -> (B, d). Learned queries pool the token states by attention
    (the encoder's states already carry context; this part learns what a question asks), and
    an MLP mixes the pools with the first token."""

    def __init__(self, dim: int, heads: int, queries: int = 4):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(1, queries, dim) * 0.02)
        self.pool = CrossAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear((queries + 1) * dim, 2 * dim), nn.GELU(),
                                 nn.Linear(2 * dim, dim))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln(tokens)
        q = self.queries.expand(x.shape[0], -1, -1)
        pooled, _ = self.pool(q, x, key_mask=mask)  # (B, queries, d)
        return self.mlp(torch.cat([x[:, 0], pooled.flatten(1)], 1))


def head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                         nn.Linear(2 * dim, out))


def _pick(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Rows of x by index (None: all, as they are). index_select, whose gradient is a fast
    index_add; x[index] would take a serial index_put."""
    return x if index is None else torch.index_select(x, 0, index)


class FusionModel(nn.Module):
    """forward(image, input_ids, attention_mask, a) -> {"logits": (B, C), "values": (B, R),
    "kinds": (B, K), "attention": (B, h, w) for cross_attention}. `a` (B,) weighs the image in
    weighted_sum and is ignored elsewhere."""

    def __init__(self, image_backbone: nn.Module, text_backbone: nn.Module, method: str,
                 grid: tuple[int, int], n_classes: int, n_values: int, n_kinds: int,
                 dim: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"fusion method {method!r}; expected one of {METHODS}")
        self.method, self.grid, self.n_kinds = method, tuple(grid), n_kinds
        self.image_backbone, self.text_backbone = image_backbone, text_backbone
        cells = grid[0] * grid[1]
        if method != "text_only":
            self.image_proj = nn.Linear(image_backbone.feature_dim, dim)
            self.cell_pos = nn.Parameter(torch.randn(cells, dim) * 0.02)  # where each cell is
        if method != "image_only":
            self.text_proj = nn.Linear(text_backbone.out_dim, dim)
            self.f2 = TextSummary(dim, heads)
            self.kind_head = nn.Linear(dim, n_kinds)
        if method in ("image_only", "weighted_sum", "concat"):
            self.f1 = ImageSummary(dim, cells)
        if method == "concat":
            self.mix = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.GELU(),
                                     nn.Linear(2 * dim, dim))
        if method == "cross_attention":
            self.cross = nn.ModuleList(CrossBlock(dim, heads) for _ in range(layers))
            self.ln = nn.LayerNorm(dim)
            # where each head looks, as a soft-argmax over cell centres in [0, 1]
            ys, xs = torch.meshgrid((torch.arange(grid[0]) + 0.5) / grid[0],
                                    (torch.arange(grid[1]) + 0.5) / grid[1], indexing="ij")
            self.register_buffer("cell_xy", torch.stack([xs, ys], -1).reshape(cells, 2),
                                 persistent=False)
            self.where = nn.Linear(layers * heads * 2, dim)
        self.classifier = head(dim, n_classes)
        self.regressor = head(dim, n_values)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """The backbone's map (B, C, h, w); cached once when the image encoder is frozen."""
        return self.image_backbone.forward_features(image)

    def forward_from(self, fmap: torch.Tensor | None, tokens: torch.Tensor | None,
                     mask: torch.Tensor | None, a: torch.Tensor,
                     image_index: torch.Tensor | None = None,
                     text_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The heads from backbone maps (I, C, h, w) and token states (T, L, D) with their mask.
        Item i reads image image_index[i] and text text_index[i] (default: row i of each), so
        that training computes each distinct image and text of a batch once. `a` float (B,)."""
        out = {}
        if self.method != "text_only":
            cells = self.image_proj(fmap.flatten(2).transpose(1, 2)) + self.cell_pos  # (I, M, d)
        if self.method != "image_only":
            q = self.f2(self.text_proj(tokens), mask)  # (T, d)
            out["kinds"] = _pick(self.kind_head(q), text_index)
            q = _pick(q, text_index)  # (B, d)
        if self.method == "image_only":
            z = _pick(self.f1(cells), image_index)
            out["kinds"] = z.new_zeros(z.shape[0], self.n_kinds)  # no text: what is asked?
        elif self.method == "text_only":
            z = q
        elif self.method == "weighted_sum":
            w = a.to(q.dtype).reshape(-1, 1)
            z = w * _pick(self.f1(cells), image_index) + (1 - w) * q
        elif self.method == "concat":
            z = self.mix(torch.cat([_pick(self.f1(cells), image_index), q], 1))
        else:  # the text's summary queries the cells, layer after layer (hop after hop)
            x, where = q.unsqueeze(1), []  # (B, 1, d)
            for blk in self.cross:
                x, att = blk(x, cells, image_index)
                where.append(att[:, :, 0] @ self.cell_xy)  # (B, H, 2)
            z = self.ln(x[:, 0]) + self.where(torch.cat(where, 1).flatten(1))
            h, w = self.grid
            out["attention"] = att[:, :, 0].mean(1).reshape(-1, h, w)  # (B, h, w)
        out["logits"] = self.classifier(z)
        out["values"] = self.regressor(z)
        return out

    def forward(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                a: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.image_features(image) if self.method != "text_only" else None
        tokens = (self.text_backbone.forward_tokens(ids, mask) if self.method != "image_only"
                  else None)
        return self.forward_from(fmap, tokens, mask, a)


def feature_grid(backbone: nn.Module, image_size: int) -> tuple[int, int]:
    """(h, w) of the backbone's spatial map at this input size."""
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        h, w = backbone.forward_features(torch.zeros(1, 3, image_size, image_size)).shape[2:]
    backbone.train(was)
    return int(h), int(w)


def fusion_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, values: torch.Tensor,
                kinds: torch.Tensor, value_weight: float = 5.0) -> dict[str, torch.Tensor]:
    """Named terms: class (cross-entropy over items that ask a class, or binary cross-entropy
    for multi-label), values (L1 over the numbers an item asks; NaN elsewhere), kind."""
    terms = {}
    if labels.ndim == 2:
        terms["class"] = F.binary_cross_entropy_with_logits(out["logits"], labels)
    elif (labels >= 0).any():
        keep = labels >= 0
        terms["class"] = F.cross_entropy(out["logits"][keep], labels[keep])
    asked = torch.isfinite(values)
    if asked.any():
        terms["values"] = value_weight * F.l1_loss(out["values"][asked], values[asked])
    if out["kinds"].requires_grad:
        terms["kind"] = F.cross_entropy(out["kinds"], kinds)
    return terms
