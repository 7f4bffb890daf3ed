"""Autoregressive decoding in numpy over any one-token step: greedy, beam search, nucleus.

A step is `step(tokens, state) -> (logprobs, state)`: tokens int64 (B,), state a dict of arrays
whose first axis is B, logprobs float (B, V) (log-softmax). The state is carried, never the
sequence, so each new token costs the same. `Captioner` binds the bundle's two caption graphs
(start: image -> state; step) to these algorithms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

State = dict[str, np.ndarray]
Step = Callable[[np.ndarray, State], tuple[np.ndarray, State]]
METHODS = ("greedy", "beam", "nucleus")


@dataclass
class Hypothesis:
    tokens: list[int]  # without the start and end tokens
    logprob: float  # sum of the chosen tokens' log-probabilities, the end token's included
    finished: bool  # ended with the end token (else it ran into max_len)

    def score(self, length_penalty: float = 0.0) -> float:
        """logprob / (length + 1) ** length_penalty: 0 ranks by probability alone, 1 by the
        mean per token (the + 1 counts the end token)."""
        return self.logprob / (len(self.tokens) + 1) ** length_penalty


def _take(state: State, rows: np.ndarray) -> State:
    return {k: v[rows] for k, v in state.items()}


def _token_by_token(step: Step, state: State, bos: int, eos: int, max_len: int,
                    choose: Callable[[np.ndarray], np.ndarray]) -> list[Hypothesis]:
    """Each of the B items of `state` decoded alone: `choose(logprobs (B, V)) -> tokens (B,)`
    picks every next token, until each item has produced the end token or max_len steps."""
    n = len(next(iter(state.values())))
    tok = np.full(n, bos, dtype=np.int64)
    seqs: list[list[int]] = [[] for _ in range(n)]
    lp, done = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(max_len):
        logp, state = step(tok, state)
        tok = choose(logp).astype(np.int64)
        lp += np.where(done, 0.0, logp[np.arange(n), tok])
        for i in np.flatnonzero(~done):
            if tok[i] != eos:
                seqs[i].append(int(tok[i]))
        done |= tok == eos
        if done.all():
            break
    return [Hypothesis(s, float(p), bool(d)) for s, p, d in zip(seqs, lp, done)]


def greedy(step: Step, state: State, bos: int, eos: int, max_len: int) -> list[Hypothesis]:
    """The most probable token at every step, for each of the B items of `state`."""
    return _token_by_token(step, state, bos, eos, max_len, lambda logp: logp.argmax(1))


def beam_search(step: Step, state: State, bos: int, eos: int, max_len: int, width: int = 3,
                length_penalty: float = 0.0) -> list[Hypothesis]:
    """Beam search for one item (`state` has B = 1); returns up to `width` hypotheses, best
    first by Hypothesis.score(length_penalty). With length_penalty 0 it stops as soon as no
    live beam can beat the worst of `width` finished ones (log-probabilities only fall)."""
    if width < 1:
        raise ValueError(f"beam width is {width}; expected at least 1")
    beams = [Hypothesis([], 0.0, False)]
    tok = np.array([bos], dtype=np.int64)
    finished: list[Hypothesis] = []
    for _ in range(max_len):
        logp, state = step(tok, state)
        total = np.array([b.logprob for b in beams])[:, None] + logp  # (beams, V)
        order = np.argsort(-total, axis=None, kind="stable")[: 2 * width]
        live, parents = [], []
        for flat in order:
            b, v = divmod(int(flat), logp.shape[1])
            hyp = Hypothesis(beams[b].tokens + ([] if v == eos else [v]), float(total[b, v]),
                             v == eos)
            if v == eos:
                finished.append(hyp)
            elif len(live) < width:
                live.append(hyp)
                parents.append(b)
        finished = sorted(finished, key=lambda h: -h.score(length_penalty))[:width]
        if not live:
            break
        if (length_penalty == 0.0 and len(finished) >= width
                and live[0].logprob <= finished[-1].logprob):
            break
        beams = live
        state = _take(state, np.array(parents))
        tok = np.array([h.tokens[-1] for h in live], dtype=np.int64)
    else:
        finished += beams  # ran into max_len: the live beams count, unfinished
    return sorted(finished, key=lambda h: -h.score(length_penalty))[:width]


def nucleus(step: Step, state: State, bos: int, eos: int, max_len: int, top_p: float = 0.9,
            temperature: float = 1.0, rng: np.random.Generator | None = None
            ) -> list[Hypothesis]:
    """Nucleus (top-p) sampling for each of the B items: at each step, sample from the
    smallest set of tokens whose probability (at `temperature`) reaches top_p."""
    if not 0.0 < top_p <= 1.0:  # NaN too
        raise ValueError(f"top_p is {top_p}; expected a probability in (0, 1]")
    if not temperature > 0.0:
        raise ValueError(f"temperature is {temperature}; expected a number above 0")
    rng = rng or np.random.default_rng()

    def choose(logp: np.ndarray) -> np.ndarray:
        z = logp.astype(np.float64) / temperature
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        order = np.argsort(-p, axis=1, kind="stable")
        sp = np.take_along_axis(p, order, 1)
        keep = np.cumsum(sp, 1) - sp < top_p  # the first token always stays
        sp = np.where(keep, sp, 0.0)
        sp /= sp.sum(1, keepdims=True)
        pick = np.array([rng.choice(len(row), p=row) for row in sp])
        return order[np.arange(len(pick)), pick]

    return _token_by_token(step, state, bos, eos, max_len, choose)


class Captioner:
    """The bundle's caption graphs: `start` maps images float32 (N, 3, S, S) to the first state
    (memory (N, M, H), hidden (N, H)); `step` maps (token, hidden, memory) to (logprobs,
    hidden, attention). Set once, then decode many."""

    def __init__(self, start: ort.InferenceSession, step: ort.InferenceSession, bos: int,
                 eos: int, max_length: int):
        self.start_session, self.step_session = start, step
        self.bos, self.eos, self.max_length = bos, eos, max_length

    def start(self, images: np.ndarray) -> State:
        memory, hidden = self.start_session.run(["memory", "hidden"], {"image": images})
        return {"memory": memory, "hidden": hidden}

    def step(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        logp, hidden = self.step_session.run(["logprobs", "hidden_out"], {
            "token": tokens, "hidden": state["hidden"], "memory": state["memory"]})
        return logp, {"memory": state["memory"], "hidden": hidden}

    def decode(self, images: np.ndarray, method: str = "beam", width: int = 3,
               top_p: float = 0.9, temperature: float = 1.0, max_length: int | None = None,
               length_penalty: float = 0.0, seed: int | None = None) -> list[Hypothesis]:
        """One best hypothesis per image (beam: the best of `width`)."""
        if method not in METHODS:
            raise ValueError(f"decoding method {method!r}; expected one of {METHODS}")
        max_len = self.max_length if max_length is None else int(max_length)
        if not 1 <= max_len <= self.max_length:
            raise ValueError(f"max_length is {max_len}; expected 1 to {self.max_length} tokens")
        state = self.start(images)
        if method == "greedy":
            return greedy(self.step, state, self.bos, self.eos, max_len)
        if method == "nucleus":
            return nucleus(self.step, state, self.bos, self.eos, max_len, top_p, temperature,
                           np.random.default_rng(seed))
        return [beam_search(self.step, _take(state, np.array([i])), self.bos, self.eos, max_len,
                            width, length_penalty)[0] for i in range(len(images))]
