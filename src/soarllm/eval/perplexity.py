"""Sliding-window perplexity.

The token stream is cut into windows of ``window`` tokens whose starts are ``stride`` apart. Each
token is scored once, in the first window that reaches it, with all the context that window gives
it (at least ``window - stride`` tokens except near the start); the first token of the stream is
never scored. PPL = exp(total negative log-likelihood / scored tokens).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from soarllm.errors import InvalidRequestError
from soarllm.eval.backends import Backend


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    first_scored: int  # index (in the stream) of the first token this window scores


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    if window < 2 or not 1 <= stride <= window:
        raise InvalidRequestError("need window >= 2 and 1 <= stride <= window")
    windows: list[Window] = []
    scored_until = 1  # token 0 has no context
    begin = 0
    while scored_until < num_tokens:
        end = min(begin + window, num_tokens)
        windows.append(Window(begin, end, scored_until))
        scored_until = end
        begin += stride
        if end == num_tokens:
            break
    return windows


@dataclass
class PerplexityResult:
    corpus: str
    perplexity: float
    nll_per_token: float  # nats
    bits_per_byte: float
    scored_tokens: int
    num_bytes: int
    window: int
    stride: int
    num_windows: int


def perplexity(
    backend: Backend, ids: list[int], *, window: int = 512, stride: int = 256,
    batch: int = 8, corpus: str = "", num_bytes: int = 0, progress: bool = False,
) -> PerplexityResult:
    """`progress` shows a bar of the windows scored (stderr), with the time left."""
    from tqdm.auto import tqdm

    windows = sliding_windows(len(ids), window, stride)
    nll, count = 0.0, 0
    bar = tqdm(total=len(windows), unit="window", desc=f"perplexity {corpus}".strip(),
               disable=not progress, file=sys.stderr)
    with bar:
        for i in range(0, len(windows), batch):
            group = windows[i : i + batch]
            scores = backend.score([ids[w.begin : w.end] for w in group])
            for w, row in zip(group, scores):
                for pos in range(w.first_scored, w.end):
                    lp = row[pos - w.begin]
                    if lp is None:
                        raise InvalidRequestError(f"the backend gave no logprob for token {pos}")
                    nll -= lp
                    count += 1
            bar.update(len(group))
    if count == 0:
        raise InvalidRequestError("the corpus is too short to score (needs 2 tokens at least)")
    per_token = nll / count
    return PerplexityResult(
        corpus=corpus,
        perplexity=math.exp(per_token),
        nll_per_token=per_token,
        bits_per_byte=nll / math.log(2) / num_bytes if num_bytes else float("nan"),
        scored_tokens=count,
        num_bytes=num_bytes,
        window=window,
        stride=stride,
        num_windows=len(windows),
    )


def corpus_perplexity(
    backend: Backend, corpus: str, *, max_tokens: int = 4096, window: int = 512,
    stride: int = 256, batch: int = 8, progress: bool = False,
) -> PerplexityResult:
    """Perplexity over the first ``max_tokens`` tokens of a corpus ('stdlib', 'prose' or a file)."""
    from soarllm.eval.corpus import corpus_text

    text = corpus_text(corpus, max_chars=max_tokens * 8)
    tokenizer = backend.tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    used_text = tokenizer.decode(ids)
    return perplexity(backend, ids, window=window, stride=stride, batch=batch, corpus=corpus,
                      num_bytes=len(used_text.encode("utf-8")), progress=progress)
