"""Queries in words the shapes world's captions never use, and retrieval measured with them.

Every test caption is rewritten word by word with the synonyms below (colors, shapes, sizes,
relations, framing words); the rewritten caption must still find its own scene. The training
captions' vocabulary holds none of the new words (a test checks), so an encoder trained only on
those captions reads them as unknown, while a pretrained sentence encoder knows them.

    python -m tests.paraphrases BUNDLE [BUNDLE ...]   # prints the table the README shows
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

SYNONYMS = {
    "red": "crimson", "blue": "azure", "green": "emerald", "yellow": "golden",
    "orange": "amber", "purple": "violet", "white": "ivory", "gray": "grey",
    "circle": "disk", "square": "box", "triangle": "triangular shape", "star": "pentagram",
    "hexagon": "hexagonal shape", "small": "tiny", "large": "huge", "above": "over",
    "below": "beneath", "picture": "photo", "image": "photo", "canvas": "backdrop",
    "alone": "by itself", "shapes": "figures", "containing": "showing",
}
_WORD = re.compile(r"[a-z]+")


def paraphrase(caption: str) -> str:
    """The caption with every word that has a synonym replaced ("an" fixed before consonants)."""
    out = _WORD.sub(lambda m: SYNONYMS.get(m.group(0), m.group(0)), caption.lower())
    return re.sub(r"\ban (?=[^aeiou])", "a ", re.sub(r"\ba (?=[aeiou])", "an ", out))


def gallery_queries(bundle: Path) -> tuple[list[str], np.ndarray]:
    """Every gallery caption and the gallery image id it belongs to."""
    gal = json.loads((bundle / json.loads((bundle / "manifest.json").read_text())["gallery"]
                      ["file"]).read_text())["items"]
    texts = [c for it in gal for c in it["captions"]]
    ids = np.array([it["id"] for it in gal for _ in it["captions"]])
    return texts, ids


def recall(engine, texts: list[str], owners: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Text -> image Recall@K through the bundle's ONNX text encoder and hnswlib index."""
    q = np.concatenate([engine.encode_texts(texts[i: i + 256])
                        for i in range(0, len(texts), 256)])
    found, _ = engine.indexes["images"].search(q, max(ks))
    return {f"R@{k}": float(np.mean([o in row[:k] for o, row in zip(owners, found)]))
            for k in ks}


def measure(bundle: Path) -> dict[str, dict[str, float]]:
    from mmdemo import Engine

    engine = Engine.load(bundle)
    texts, owners = gallery_queries(bundle)
    return {"captions": recall(engine, texts, owners),
            "paraphrases": recall(engine, [paraphrase(t) for t in texts], owners)}


def main(argv: list[str]) -> None:
    print("| bundle | text encoder | t2i R@1 / R@5 / R@10, captions | same, paraphrases |")
    print("|---|---|---|---|")
    for b in map(Path, argv):
        m, cfg = measure(b), json.loads((b / "manifest.json").read_text())["model_config"]
        enc = cfg.get("hf_model") or cfg["text_encoder"]
        row = [" / ".join(f"{m[s][f'R@{k}']:.3f}" for k in (1, 5, 10))
               for s in ("captions", "paraphrases")]
        print(f"| {b.name} | {enc} | {row[0]} | {row[1]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
