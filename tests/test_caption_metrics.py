"""BLEU-4 and CIDEr-D (pycocoevalcap) against values worked by hand, and our PTB-like tokenizer."""

from __future__ import annotations

import math

import pytest

from training.caption_metrics import caption_scores, tokenize


def test_tokenizer_lowercases_and_drops_punctuation():
    assert tokenize("Two shapes: a Red circle, and a star.") == [
        "two", "shapes", "a", "red", "circle", "and", "a", "star"]
    assert tokenize("  on the LEFT is a blue square ,on the right...  ") == [
        "on", "the", "left", "is", "a", "blue", "square", "on", "the", "right"]
    # as PTB: hyphenated words and decimals are one token; lone dashes and quotes are dropped
    assert tokenize('a left-hand "star" -- 2.5 px!') == ["a", "left-hand", "star", "2.5", "px"]
    assert tokenize("") == [] and tokenize("?!") == []


def test_exact_match_scores_bleu_one():
    cap = "a small red circle left of a large blue square"
    s = caption_scores({1: cap, 2: "two shapes: a red star and a gray hexagon"},
                       {1: [cap, "something else entirely"],
                        2: ["Two shapes: a red star, and a gray hexagon."]})
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_bleu_with_brevity_penalty_and_partial_precisions():
    ref = "a red circle left of a blue square"  # 8 words
    cand = "A red circle, left of a square."  # 7 words after tokenizing
    # 1-grams: a, red, circle, left, of, a, square: all 7 in the reference (it has "a" twice): 7/7
    # 2-grams: a red, red circle, circle left, left of, of a | a square (ref: a blue): 5/6
    # 3-grams: a red circle, red circle left, circle left of, left of a | of a square: 4/5
    # 4-grams: a red circle left, red circle left of, circle left of a | left of a square: 3/4
    # geometric mean: (1 * 5/6 * 4/5 * 3/4) ** (1/4) = (1/2) ** (1/4)
    # brevity penalty: c = 7 < r = 8: exp(1 - 8/7) = exp(-1/7)
    want = math.exp(-1 / 7) * 0.5 ** 0.25  # 0.72895...
    assert caption_scores({7: cand}, {7: [ref]})["BLEU-4"] == pytest.approx(want, rel=1e-6)
    # the closest reference length counts: with a 7-word reference too there is no penalty, and
    # n-grams are clipped by their largest count in any one reference (same counts here)
    s = caption_scores({7: cand}, {7: [ref, "a red circle left of a star"]})
    assert s["BLEU-4"] == pytest.approx(0.5 ** 0.25, rel=1e-6)


def test_cider_d_on_three_images_by_hand():
    refs = {"A": ["a red circle"], "B": ["a blue square"], "C": ["a red star"]}
    cands = {"A": "a red circle", "B": "A blue square.", "C": "a red star on the canvas"}
    # IDF over the 3 images' references: log(3) - log(df), df = images whose references hold it.
    #   "a": df 3 -> 0;  "red", "a red": df 2 -> log 1.5;  every other n-gram, and any n-gram no
    #   reference holds (df taken as 1): log 3.
    l15, l3 = math.log(1.5), math.log(3)
    # A and B repeat their reference: cosine 1 for n = 1, 2, 3; no 4-grams on either side: 0.
    # score = 10 * mean(1, 1, 1, 0) = 7.5 each.
    # C: 6 words against 3; the penalty uses the two lengths: exp(-(6 - 3)^2 / (2 * 6^2)).
    penalty = math.exp(-9 / 72)
    # n = 1: candidate {a: 0, red: l15, star, on, the, canvas: l3}, reference {a: 0, red: l15,
    #   star: l3}; clipped products: red l15^2, star l3^2, the rest 0 (not in the reference).
    #   cos = (l15^2 + l3^2) / (sqrt(l15^2 + 4 l3^2) * sqrt(l15^2 + l3^2))
    # n = 2: {a red: l15, red star, star on, on the, the canvas: l3} against {a red: l15,
    #   red star: l3}: the same value.
    cos12 = math.sqrt(l15**2 + l3**2) / math.sqrt(l15**2 + 4 * l3**2)  # 0.52412
    # n = 3: {a red star, red star on, star on the, on the canvas: l3 each} against
    #   {a red star: l3}: l3^2 / (2 l3 * l3) = 1/2
    # n = 4: the reference has none: 0
    c = 10 * penalty * (cos12 + cos12 + 0.5 + 0.0) / 4  # 3.41579
    want = (7.5 + 7.5 + c) / 3  # 6.13859
    s = caption_scores(cands, refs)
    assert s["CIDEr-D"] == pytest.approx(want, rel=1e-6)
    assert s["CIDEr-D"] == pytest.approx(6.13859, abs=1e-4)


def test_cider_d_averages_over_references():
    refs = {"A": ["a red circle", "a blue square"], "B": ["a red star"], "C": ["a gray hexagon"]}
    # A: "a red circle" against each reference in turn, then the mean. IDF (3 images): "a" 0,
    #   "red" log 1.5 (A and B), every other n-gram log 3.
    #   against "a red circle": cos 1 for n = 1..3, 0 for n = 4: 10 * 3/4 = 7.5
    #   against "a blue square": only "a" is shared and weighs 0: 0
    #   A = (7.5 + 0) / 2 = 3.75; B, C ("a gray square" vs "a gray hexagon") below.
    # C: n = 1: {a: 0, gray: l3, square: l3} vs {a: 0, gray: l3, hexagon: l3}: l3^2 / (2 l3^2)
    #   = 1/2; n = 2: {a gray, gray square} vs {a gray, gray hexagon}: 1/2; n = 3: 0: 10 * 1/4
    cands = {"A": "a red circle", "B": "a red star", "C": "a gray square"}
    want = (3.75 + 7.5 + 2.5) / 3
    assert caption_scores(cands, refs)["CIDEr-D"] == pytest.approx(want, rel=1e-6)


def test_mismatched_ids_and_empty_references_are_errors():
    with pytest.raises(ValueError, match="differ in image ids"):
        caption_scores({1: "a red circle"}, {2: ["a red circle"]})
    with pytest.raises(ValueError, match="image 1 has no reference"):
        caption_scores({1: "a red circle"}, {1: []})
    with pytest.raises(ValueError, match="no captions"):
        caption_scores({}, {})
