"""Caption decoder: a GRU that attends over the image encoder's spatial map, one token a step.

Reads bottom-up: attention, the decoder, its builder. The image side is the dual encoder's own
backbone (frozen: its maps are computed once); what is learned is a projection of the map into
a memory of cells, and the step. A step carries only the hidden state, so every new token costs
the same, which is what `mmdemo.decoding` (greedy, beam, nucleus) relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class CellAttention(nn.Module):
    """Scaled dot-product attention of one query over the memory's cells."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.scale = dim ** -0.5

    def forward(self, h: torch.Tensor, memory: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, H), memory (B, M, H) -> context (B, H), weights (B, M) summing to 1."""
        scores = torch.einsum("bh,bmh->bm", self.query(h), memory) * self.scale
        w = scores.softmax(-1)
        return torch.einsum("bm,bmh->bh", w, memory), w


class CaptionDecoder(nn.Module):
    """memory = proj(map) + position; h0 = tanh(W mean(memory));
    step: context = attend(h, memory); h' = GRU([embed(token), context], h);
    logits = out([h', attend(h', memory)])."""

    def __init__(self, feature_dim: int, grid: tuple[int, int], vocab_size: int,
                 dim: int = 192, embed: int = 64, dropout: float = 0.1):
        super().__init__()
        self.grid, self.dim = tuple(grid), dim
        cells = grid[0] * grid[1]
        self.proj = nn.Sequential(nn.Linear(feature_dim, dim), nn.LayerNorm(dim))
        self.pos = nn.Parameter(torch.randn(1, cells, dim) * 0.02)
        self.init_h = nn.Linear(dim, dim)
        self.embed = nn.Embedding(vocab_size, embed)
        self.attend = CellAttention(dim)
        self.gru = nn.GRUCell(embed + dim, dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(2 * dim, vocab_size)
        self.read = CellAttention(dim)

    def start(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fmap (B, C, h, w) -> memory (B, M, H), hidden (B, H)."""
        memory = self.proj(fmap.flatten(2).transpose(1, 2)) + self.pos  # (B, hw, H)
        return memory, torch.tanh(self.init_h(memory.mean(1)))

    def step(self, token: torch.Tensor, hidden: torch.Tensor, memory: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """token int64 (B,), hidden (B, H), memory (B, M, H) ->
        logits (B, V), new hidden (B, H), attention (B, M) of the read-out."""
        ctx, _ = self.attend(hidden, memory)
        h = self.gru(torch.cat([self.embed(token), ctx], 1), hidden)
        ctx2, w = self.read(h, memory)
        return self.out(self.drop(torch.cat([h, ctx2], 1))), h, w

    def forward(self, fmap: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: fmap (B, C, h, w), tokens int64 (B, L) starting with [CLS] ->
        logits (B, L, V) predicting tokens[:, 1:] and what follows the last."""
        memory, h = self.start(fmap)
        out = []
        for t in range(tokens.shape[1]):
            logits, h, _ = self.step(tokens[:, t], h, memory)
            out.append(logits)
        return torch.stack(out, 1)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int,
                 smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Token cross-entropy over (B, L, V) logits and (B, L) targets, padding ignored."""
    return {"tokens": F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                      ignore_index=pad_id, label_smoothing=smoothing)}


@dataclass
class CaptionerModelConfig:
    feature_dim: int  # channels of the image backbone's map
    grid: tuple[int, int]  # (h, w) of that map
    vocab_size: int  # the run's tokenizer
    dim: int = 192  # GRU and memory width
    embed: int = 64  # token embedding width
    dropout: float = 0.1  # before the output layer


def build_captioner(cfg: CaptionerModelConfig) -> CaptionDecoder:
    return CaptionDecoder(cfg.feature_dim, tuple(cfg.grid), cfg.vocab_size, cfg.dim, cfg.embed,
                          cfg.dropout)
