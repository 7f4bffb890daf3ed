"""Train a WordPiece tokenizer on captions with Hugging Face `tokenizers`."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: list[str], out: Path | str, vocab_size: int = 2000) -> Path:
    """Fit WordPiece on `texts`, add [CLS] ... [SEP], save tokenizer.json at `out`."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                             special_tokens=SPECIAL))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(str(out))
    return Path(out)


def hf_tokenizer_json(name_or_path: str, out: Path | str) -> str:
    """Save the fast tokenizer of a transformers model as tokenizer.json; returns its pad token."""
    from transformers import AutoTokenizer

    from training.models import resolve_hf_model

    tok = AutoTokenizer.from_pretrained(resolve_hf_model(name_or_path))
    if tok.pad_token is None:
        raise ValueError(f"the tokenizer of {name_or_path} has no pad token")
    tok.backend_tokenizer.save(str(out))
    return tok.pad_token
