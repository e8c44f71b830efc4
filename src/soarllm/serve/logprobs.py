"""Engine logprobs -> the OpenAI shapes: the legacy completions format (tokens, token_logprobs,
top_logprobs, text_offset) and the chat format (content[] with bytes and top_logprobs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from soarllm.outputs import Logprob, TokenLogprobs


def visible(tokenizer: Any, token_ids: Sequence[int], logprobs: Sequence[Any],
            skip_special_tokens: bool) -> tuple[list[int], list[Any]]:
    """The generated tokens whose text is in the output: special tokens (the end-of-turn token
    that stopped the request) are left out when the text skips them, so the logprob tokens join
    to the text."""
    if not skip_special_tokens:
        return list(token_ids), list(logprobs)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    kept = [(t, lp) for t, lp in zip(token_ids, logprobs) if t not in special]
    return [t for t, _ in kept], [lp for _, lp in kept]


def token_text(tokenizer: Any, token_id: int, entry: TokenLogprobs | None = None) -> str:
    lp = entry.get(token_id) if entry else None
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id])


def _finite(x: float) -> float:
    """JSON has no -inf: clamp to the most negative float a client can parse."""
    return x if math.isfinite(x) else -9999.0


def _top(entry: TokenLogprobs, k: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
    return [(tid, lp) for tid, lp in ranked if lp.rank <= k]


class CompletionLogprobsBuilder:
    """Accumulates the legacy format across stream chunks (text_offset runs on)."""

    def __init__(self, tokenizer: Any, k: int, start_offset: int = 0):
        self.tokenizer = tokenizer
        self.k = k
        self.offset = start_offset

    def build(self, token_ids: Sequence[int],
              logprobs: Sequence[TokenLogprobs | None]) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}
        for tid, entry in zip(token_ids, logprobs):
            text = token_text(self.tokenizer, tid, entry)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if entry is None:  # the first prompt token has no logprob
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            chosen = entry.get(tid)
            out["token_logprobs"].append(_finite(chosen.logprob) if chosen else None)
            top = {token_text(self.tokenizer, t, entry): _finite(lp.logprob)
                   for t, lp in _top(entry, self.k)}
            if chosen is not None:
                top.setdefault(text, _finite(chosen.logprob))
            out["top_logprobs"].append(top)
        return out


def chat_logprobs(tokenizer: Any, token_ids: Sequence[int],
                  logprobs: Sequence[TokenLogprobs], k: int) -> list[dict[str, Any]]:
    content = []
    for tid, entry in zip(token_ids, logprobs):
        text = token_text(tokenizer, tid, entry)
        chosen = entry.get(tid)
        content.append({
            "token": text,
            "logprob": _finite(chosen.logprob) if chosen else -9999.0,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := token_text(tokenizer, i, entry)), "logprob": _finite(lp.logprob),
                 "bytes": list(t.encode("utf-8"))}
                for i, lp in _top(entry, k)
            ],
        })
    return content
