"""Text to token ids with Hugging Face `tokenizers`, shared by training and serving."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

MAX_CHARS = 2000  # longer texts are cut here before tokenizing; the model reads far fewer tokens


def clean_text(text) -> tuple[str, list[str]]:
    """The text a model should read, and notices of what was changed.

    Control characters (NUL included) are dropped, runs of whitespace become one space, and a
    text over MAX_CHARS characters is cut there. An empty result is a ValueError.
    """
    if text is None:
        raise ValueError("no text given; type a description such as 'a red circle'")
    s, notices = str(text), []
    ctrl = sum(1 for ch in s if unicodedata.category(ch) in ("Cc", "Cf", "Cs")
               and not ch.isspace())
    if ctrl:
        s = "".join(ch for ch in s if ch.isspace() or unicodedata.category(ch)
                    not in ("Cc", "Cf", "Cs"))
        notices.append(f"{ctrl} control character{'s' * (ctrl > 1)} removed from the text")
    s = " ".join(s.split())
    if not s:
        raise ValueError("empty text; type a description such as 'a red circle'")
    if len(s) > MAX_CHARS:
        notices.append(f"the text has {len(s):,} characters; only the first {MAX_CHARS:,} "
                       "were read")
        s = s[:MAX_CHARS]
    return s, notices


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

    def notices(self, text: str) -> list[str]:
        """What the model will not see of `text`: tokens past max_length, unknown words."""
        enc = self.tokenizer.encode(text)
        out = []
        if enc.overflowing:
            out.append(f"the text is longer than the model reads ({self.max_length} tokens, "
                       "special tokens included); the rest was ignored")
        unk = self.tokenizer.token_to_id(self.tokenizer.model.unk_token) \
            if hasattr(self.tokenizer.model, "unk_token") else None
        if unk is not None:
            words = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk
                     and not all(unicodedata.category(ch).startswith("P") for ch in text[a:b])]
            # (unknown punctuation, such as the '?' of a question, carries no meaning to flag)
            if words:
                shown = ", ".join(dict.fromkeys(words[:8]))
                out.append(f"the model's vocabulary has no token for: {shown} (read as unknown)")
        return out

    def decode(self, seqs: list[list[int]]) -> list[str]:
        """Token ids back to text, special tokens dropped, WordPiece pieces joined."""
        if self.tokenizer.decoder is None:  # a tokenizer trained here has none: WordPiece's
            from tokenizers import decoders

            self.tokenizer.decoder = decoders.WordPiece()
        texts = self.tokenizer.decode_batch([[int(i) for i in s] for s in seqs],
                                            skip_special_tokens=True)
        return [re.sub(r" ([,.:;?!])", r"\1", t) for t in texts]  # "shapes :" -> "shapes:"

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids int64 (N, L) and attention mask int64 (N, L), L = longest text (<= max_length)."""
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got one string")
        enc = self.tokenizer.encode_batch([str(t) for t in texts])
        ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(texts), -1)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(len(texts), -1)
        return ids, mask
