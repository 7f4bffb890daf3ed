"""Caption metrics of the COCO caption evaluation: BLEU-4 and CIDEr-D, by pycocoevalcap.

pycocoevalcap's own PTBTokenizer runs Stanford CoreNLP under Java, which this project does not
need; captions are tokenized here by `tokenize` instead, which agrees with it on captions like
ours (see its docstring), and the tokenized strings go to pycocoevalcap's `Bleu(4)` and `Cider`
(pycocoevalcap's Cider is CIDEr-D: n-grams 1..4, Gaussian length penalty with sigma 6, clipped
term frequencies, times 10, document frequencies from the references of the corpus scored).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping

_TOKEN = re.compile(r"\d+(?:\.\d+)+|[a-z0-9]+(?:['-][a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercased words with punctuation dropped, as the COCO evaluation's PTB tokenization with
    punctuation removal gives them for plain captions: "Two shapes: a Red circle, and a star."
    -> ["two", "shapes", "a", "red", "circle", "and", "a", "star"].

    Hyphenated words ("left-hand") and decimals ("2.5") stay one token, as in PTB; unlike PTB,
    clitics stay on their word ("it's" is one token, PTB gives "it 's").
    """
    return _TOKEN.findall(text.lower())


def caption_scores(candidates: Mapping[Hashable, str],
                   references: Mapping[Hashable, list[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of one candidate caption per image against its references.

    candidates: {image id: caption}; references: {image id: [caption, ...]} with the same ids.
    BLEU-4 is corpus-level (n-gram counts summed over images, brevity penalty from the closest
    reference length); CIDEr-D is the mean over images, so it needs a corpus of several images
    (with one, every n-gram's IDF is 0). Returns {"BLEU-4": float, "CIDEr-D": float}.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(candidates) != set(references):
        missing = sorted(map(str, set(candidates) ^ set(references)))[:5]
        raise ValueError(f"candidates and references differ in image ids, e.g. {missing}")
    if not candidates:
        raise ValueError("no captions to score")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"image {empty[0]!r} has no reference captions")
    res = {k: [" ".join(tokenize(c))] for k, c in candidates.items()}
    gts = {k: [" ".join(tokenize(r)) for r in references[k]] for k in candidates}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "CIDEr-D": float(cider)}
