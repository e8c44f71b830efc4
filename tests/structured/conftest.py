"""Fixtures of the structured-output tests: a hand-written tiny vocabulary for mask unit tests
(the tiny random checkpoint and the real ``soar serve`` over it come from tests/conftest.py)."""

from __future__ import annotations

import llguidance
import pytest

# id -> token text; id 0 is the end-of-sequence token
VOCAB = ["<eos>", "a", "b", "ab", "aa", "ba", "c", "{", "}", '"', ":", ",", " ", "1", "12", "0",
         "-", "true", "tr", "ue", "fa", "lse", "false", "x", "\n"]
EOS = 0


def tok(*texts: str) -> list[int]:
    """Token ids of the given token texts."""
    return [VOCAB.index(t) for t in texts]


class _GreedyTokenizer:
    """What llguidance needs of a tokenizer: the bytes of each token, and a tokenize function
    (longest match first; bytes no token covers are dropped)."""

    def __init__(self) -> None:
        self.tokens = [t.encode() for t in VOCAB]
        self.eos_token_id = EOS
        self.bos_token_id = None
        self.special_token_ids = [EOS]

    def __call__(self, data: bytes) -> list[int]:
        out, i = [], 0
        while i < len(data):
            fits = [j for j, t in enumerate(self.tokens) if j != EOS and data.startswith(t, i)]
            if not fits:
                i += 1
                continue
            best = max(fits, key=lambda j: len(self.tokens[j]))
            out.append(best)
            i += len(self.tokens[best])
        return out


@pytest.fixture(scope="session")
def tiny_vocab() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_GreedyTokenizer()),
                                  n_vocab=len(VOCAB))
