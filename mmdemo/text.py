"""Text to token ids with Hugging Face `tokenizers`, shared by training and serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class TextTokenizer:
    """Wraps a `tokenizer.json`; pads to the longest text in a batch, truncates at max_length."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = 32, pad_token: str = "[PAD]"):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer has no pad token {pad_token!r}")
        self.tokenizer, self.max_length, self.pad_token, self.pad_id = (
            tokenizer, max_length, pad_token, pad_id)
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)

    @classmethod
    def from_file(cls, path: Path | str, max_length: int = 32, pad_token: str = "[PAD]"
                  ) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)), max_length, pad_token)

    def settings(self) -> dict:
        return {"max_length": self.max_length, "pad_token": self.pad_token,
                "vocab_size": self.tokenizer.get_vocab_size()}

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids int64 (N, L) and attention mask int64 (N, L), L = longest text (<= max_length)."""
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got one string")
        enc = self.tokenizer.encode_batch([str(t) for t in texts])
        ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(texts), -1)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(len(texts), -1)
        return ids, mask
