"""Prompt lookup (n-gram) proposer: find the latest earlier occurrence of the text's last n tokens
in the prompt and output so far, and propose the tokens that followed it.

Longer suffixes are tried first (``prompt_lookup_max`` down to ``prompt_lookup_min``): a longer
match is better evidence that the continuation repeats.
"""

from __future__ import annotations

import numpy as np

from soarllm.engine.request import Request
from soarllm.spec.proposer import Proposer


def lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """The up-to-k tokens after the latest earlier occurrence of ``tokens``' last n tokens."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n :]
        # candidate starts: positions where the first suffix token occurs, excluding the suffix itself
        starts = np.flatnonzero(tokens[: length - n] == suffix[0])
        for s in starts[::-1]:  # latest first
            if np.array_equal(tokens[s : s + n], suffix):
                follow = tokens[s + n : s + n + k]
                if len(follow):
                    return follow.tolist()
    return []


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max

    def propose(self, req: Request, k: int) -> list[int]:
        return lookup(np.asarray(req.all_token_ids, dtype=np.int64), k, self.n_min, self.n_max)
