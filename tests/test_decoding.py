"""Greedy, beam search and nucleus sampling (mmdemo.decoding) on tiny hand-built models whose
best sequence is known by enumerating every sequence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mmdemo.decoding import beam_search, greedy, nucleus

BOS, EOS = 0, 1


def markov(table: np.ndarray):
    """A step whose next-token distribution depends on the last token only: table (V, V) of
    probabilities, row = last token. The state carries the last token."""
    logt = np.log(table)

    def step(tokens, state):
        return logt[tokens], {"last": tokens[:, None]}

    return step, {"last": np.array([[BOS]])}


def best_by_enumeration(table: np.ndarray, max_len: int) -> tuple[list[int], float]:
    """The most probable sequence ending in EOS within max_len steps, by trying them all."""
    v = len(table)
    words = [t for t in range(v) if t not in (BOS, EOS)]
    best, best_lp = None, -np.inf
    for n in range(max_len):
        for seq in itertools.product(words, repeat=n):
            path = [BOS, *seq, EOS]
            lp = sum(np.log(table[a, b]) for a, b in zip(path, path[1:]))
            if lp > best_lp:
                best, best_lp = list(seq), lp
    return best, best_lp


def test_beam_finds_what_greedy_misses():
    # from the start: "a" 0.55, "b" 0.45; after "a" the mass is spread (no good ending), after
    # "b" the end is likely. Greedy takes "a"; the best sequence is "b" then the end (0.405).
    v = 4  # BOS, EOS, a, b
    t = np.full((v, v), 1e-9)
    t[BOS, 2], t[BOS, 3] = 0.55, 0.45
    t[2, EOS], t[2, 2], t[2, 3] = 0.3, 0.35, 0.35
    t[3, EOS], t[3, 2], t[3, 3] = 0.9, 0.05, 0.05
    t /= t.sum(1, keepdims=True)
    step, state = markov(t)
    best, best_lp = best_by_enumeration(t, 5)
    assert best == [3]
    g = greedy(step, state, BOS, EOS, 5)[0]
    assert g.tokens != best and g.logprob < best_lp - 0.5
    b = beam_search(step, state, BOS, EOS, 5, width=2)[0]
    assert b.tokens == best and b.finished
    assert b.logprob == pytest.approx(best_lp, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_wide_beam_equals_enumeration_on_random_models(seed):
    rng = np.random.default_rng(seed)
    v, max_len = 5, 4
    t = rng.dirichlet(np.full(v, 0.6), size=v)
    t[:, BOS] = 1e-9  # the start token is never produced
    t /= t.sum(1, keepdims=True)
    step, state = markov(t)
    best, best_lp = best_by_enumeration(t, max_len)
    hyps = beam_search(step, state, BOS, EOS, max_len, width=v ** max_len)
    finished = [h for h in hyps if h.finished]
    assert finished[0].tokens == best, (finished[0], best, best_lp)
    assert finished[0].logprob == pytest.approx(best_lp, abs=1e-9)
    # and the hypotheses come best first, each a different sequence
    scores = [h.score() for h in hyps]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(h.tokens) for h in hyps}) == len(hyps)


def test_length_penalty_prefers_longer_sequences():
    v = 4
    t = np.full((v, v), 1e-9)
    t[BOS, EOS], t[BOS, 2] = 0.4, 0.6  # ending at once: 0.4; "a a end": 0.6 * 0.9 * 0.6
    t[2, 2], t[2, EOS] = 0.4, 0.6
    t[3, EOS] = 1.0
    t /= t.sum(1, keepdims=True)
    step, state = markov(t)
    assert beam_search(step, state, BOS, EOS, 6, width=3)[0].tokens == []
    assert beam_search(step, state, BOS, EOS, 6, width=3, length_penalty=1.0)[0].tokens == [2]


def test_nucleus_samples_only_inside_the_nucleus_and_repeats_with_a_seed():
    v = 6
    t = np.full((v, v), 1e-9)
    t[BOS, 2:] = [0.5, 0.3, 0.15, 0.05]  # top-p 0.75 keeps tokens 2 and 3 only (0.5 < 0.75 <= 0.8)
    t[2:, EOS] = 1.0
    t /= t.sum(1, keepdims=True)
    step, _ = markov(t)
    state = {"last": np.full((400, 1), BOS)}
    out = nucleus(step, state, BOS, EOS, 3, top_p=0.75, rng=np.random.default_rng(0))
    firsts = np.array([h.tokens[0] for h in out])
    assert set(firsts) == {2, 3}
    assert 0.5 < np.mean(firsts == 2) < 0.75  # 0.5 / 0.8 = 0.625 renormalised
    again = nucleus(step, state, BOS, EOS, 3, top_p=0.75, rng=np.random.default_rng(0))
    assert [h.tokens for h in again] == [h.tokens for h in out]
    # a nucleus of one token is greedy; a low temperature too
    assert {h.tokens[0] for h in nucleus(step, state, BOS, EOS, 3, top_p=0.01)} == {2}
    assert {h.tokens[0] for h in nucleus(step, state, BOS, EOS, 3, temperature=0.05)} == {2}


def test_bad_settings_are_refused_with_the_value():
    step, state = markov(np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="top_p is 0"):
        nucleus(step, state, BOS, EOS, 3, top_p=0.0)
    with pytest.raises(ValueError, match="temperature is -1"):
        nucleus(step, state, BOS, EOS, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="beam width is 0"):
        beam_search(step, state, BOS, EOS, 3, width=0)
