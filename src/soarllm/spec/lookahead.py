"""Lookahead decoding (Fu et al., 2024): guesses from the model's own Jacobi iterations, no draft.

Per request the proposer keeps a 2-D window of guessed tokens, N - 1 levels of W columns, and a
pool of n-grams the window produced. Each step sends, in one row after the request's last known
token x (at position p):

- the verification branch: up to G n-grams from the pool that start with x (N - 1 tokens each, at
  positions p + 1 ...; each attends to x and its own earlier tokens);
- the lookahead branch: level 0 of the window at columns 1..W-1 (column 0 is x itself), positions
  p + i, then levels j = 1..N-2 at positions p + i + j; a token at level j, column i attends to
  level 0 up to column i and to its own column's levels 1..j: each column is one Jacobi trajectory.

The target verifies the candidates like drafts (lossless: sample/verifier.py). The greedy next
tokens of the window's last level come back; with them the window shifts one level up, and each
column yields an n-gram (its level-0 token, then its levels 1..N-2, then the new token) for the
pool (at most G per first token, the oldest replaced). With ``pool_from_prompt`` (the reference
implementation's option of that name, on by default) the pool starts with the prompt's n-grams. For every further token a step emits the
window shifts once more, its new last level copied from level 0.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

import numpy as np

from soarllm.engine.request import Request
from soarllm.scheduler_output import SpecLayout
from soarllm.spec.proposer import Proposer


@dataclass
class _State:
    window: list[list[int]]  # N - 1 levels x W columns
    pool: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)  # first token -> n-grams
    head: dict[int, int] = field(default_factory=dict)  # next slot to replace per first token


def lookahead_layout(w: int, n: int, num_candidates: int) -> SpecLayout:
    """The row layout (positions, mask, candidate rows, window rows) for a window of W columns,
    n-grams of N tokens and ``num_candidates`` guessed continuations of N - 1 tokens."""
    positions = [0]
    rows_of_cand: list[list[int]] = []
    for _ in range(num_candidates):
        rows_of_cand.append(list(range(len(positions), len(positions) + n - 1)))
        positions.extend(range(1, n))
    level0 = {0: 0}  # column -> row
    for i in range(1, w):
        level0[i] = len(positions)
        positions.append(i)
    level_rows: dict[tuple[int, int], int] = {}
    for j in range(1, n - 1):
        for i in range(w):
            level_rows[(j, i)] = len(positions)
            positions.append(i + j)
    t = len(positions)
    mask = np.zeros((t, t), dtype=np.bool_)
    mask[:, 0] = True
    for rows in rows_of_cand:
        for a, r in enumerate(rows):
            mask[r, rows[: a + 1]] = True
    for i in range(w):
        cols = [level0[c] for c in range(i + 1)]
        mask[level0[i], cols] = True
        for j in range(1, n - 1):
            r = level_rows[(j, i)]
            mask[r, cols] = True
            mask[r, [level_rows[(jj, i)] for jj in range(1, j + 1)]] = True
    last = n - 2
    window_rows = [level0[i] if last == 0 else level_rows[(last, i)] for i in range(w)]
    return SpecLayout(positions, mask, rows_of_cand, window_rows)


class LookaheadProposer(Proposer):
    name = "lookahead"

    def __init__(self, window: int = 4, ngram: int = 3, guesses: int = 4,
                 pool_from_prompt: bool = True, seed: int = 0):
        self.w, self.n, self.g = window, ngram, guesses
        self.pool_from_prompt = pool_from_prompt
        self.seed = seed
        self._state: dict[str, _State] = {}
        self._layouts: dict[int, SpecLayout] = {}

    def propose(self, req: Request, k: int) -> list[int]:
        """Only the first candidate as a chain (lookahead steps go through ``plan``)."""
        st = self._state.get(req.request_id)
        cands = st.pool.get(req.all_token_ids[-1], []) if st else []
        return list(cands[0][:k]) if cands else []

    def _init(self, req: Request) -> _State:
        rng = random.Random(zlib.crc32(req.request_id.encode()) ^ self.seed)
        src = req.all_token_ids
        window = [[src[rng.randrange(len(src))] for _ in range(self.w)] for _ in range(self.n - 1)]
        st = _State(window)
        if self.pool_from_prompt:  # the prompt's own n-grams (the latest G per first token)
            for i in range(len(src) - self.n + 1):
                self._add(st, src[i], tuple(src[i + 1 : i + self.n]))
        return st

    def plan(self, req: Request) -> tuple[list[int], SpecLayout]:
        """This step's spec tokens (rows 1.. of the layout) and their layout."""
        st = self._state.get(req.request_id)
        if st is None:
            st = self._state[req.request_id] = self._init(req)
        cands = st.pool.get(req.all_token_ids[-1], [])
        layout = self._layouts.get(len(cands))
        if layout is None:
            layout = self._layouts[len(cands)] = lookahead_layout(self.w, self.n, len(cands))
        tokens: list[int] = []
        for c in cands:
            tokens.extend(c)
        tokens.extend(st.window[0][1:])
        for j in range(1, self.n - 1):
            tokens.extend(st.window[j])
        return tokens, layout

    def update(self, req: Request, num_emitted: int, window_next: list[int], first: int) -> None:
        """After a lookahead step of ``req`` that emitted ``num_emitted`` tokens: ``window_next``
        are the greedy next tokens of the window's last level, ``first`` was the step's input
        token (the window's column 0 at level 0)."""
        st = self._state.get(req.request_id)
        if st is None or len(window_next) != self.w:
            return
        win = st.window
        win[0][0] = first
        for v in range(num_emitted):
            prev0 = win[0]
            del win[0]
            if v == 0:
                win.append(list(window_next))
                for f in range(self.w):
                    self._add(st, prev0[f], tuple(win[j][f] for j in range(self.n - 1)))
            else:
                win.append(list(win[0] if win else prev0))

    def _add(self, st: _State, key: int, gram: tuple[int, ...]) -> None:
        grams = st.pool.setdefault(key, [])
        if gram in grams:
            return
        if len(grams) < self.g:
            grams.append(gram)
        else:
            h = st.head.get(key, 0)
            grams[h] = gram
            st.head[key] = (h + 1) % self.g

    def forget(self, request_id: str) -> None:
        self._state.pop(request_id, None)
