"""Suffix proposer ("memory decoding"): guesses from what the server generated before.

Finished requests' outputs (with the end of their prompts as context) go into a shared table: for
every context of ``n_min``..``n_max`` tokens, how often each next token followed it. A request's
guesses come first from its own text (the latest earlier occurrence of its last tokens, as prompt
lookup does), else from the table: starting from the request's last tokens, the continuation seen
most often after the longest context known, extended token by token. Code assistants, agents and
templated outputs repeat themselves across requests; that is what this finds.

The table is bounded: beyond ``max_entries`` contexts the oldest are dropped (insertion order).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from soarllm.engine.request import Request
from soarllm.spec.ngram import lookup
from soarllm.spec.proposer import Proposer


class SuffixProposer(Proposer):
    name = "suffix"

    def __init__(self, n_min: int = 2, n_max: int = 6, min_token_prob: float = 0.4,
                 max_entries: int = 1 << 20):
        self.n_min, self.n_max, self.max_entries = n_min, n_max, max_entries
        # a guess from the table needs this share of what followed its context
        self.min_token_prob = min_token_prob
        self.table: OrderedDict[tuple[int, ...], dict[int, int]] = OrderedDict()

    def learn(self, req: Request) -> None:
        out = req.output_token_ids
        if not out:
            return
        seq = list(req.all_token_ids[max(0, req.num_prompt_tokens - self.n_max):])
        first = len(seq) - len(out)  # index in seq of the first output token
        for i in range(max(first, self.n_min), len(seq)):
            nxt = seq[i]
            for n in range(self.n_min, min(self.n_max, i) + 1):
                key = tuple(seq[i - n : i])
                counts = self.table.get(key)
                if counts is None:
                    counts = self.table[key] = {}
                counts[nxt] = counts.get(nxt, 0) + 1
        while len(self.table) > self.max_entries:
            self.table.popitem(last=False)

    def _next(self, ctx: list[int]) -> int | None:
        for n in range(min(self.n_max, len(ctx)), self.n_min - 1, -1):
            counts = self.table.get(tuple(ctx[-n:]))
            if counts:
                tok, c = max(counts.items(), key=lambda kv: kv[1])
                return tok if c >= self.min_token_prob * sum(counts.values()) else None
        return None

    def propose(self, req: Request, k: int) -> list[int]:
        own = lookup(np.asarray(req.all_token_ids, dtype=np.int64), k, self.n_min, self.n_max)
        if own or not self.table:
            return own
        ctx = list(req.all_token_ids[-self.n_max:])
        out: list[int] = []
        while len(out) < k:
            tok = self._next(ctx)
            if tok is None:
                break
            out.append(tok)
            ctx = ctx[1:] + [tok]
        return out
