"""Tokenizer work off the event loop, and refusing prompts too long to ever fit before tokenizing.

Encoding a long prompt, rendering a chat template or decoding many token ids takes as long as the
text is long (seconds for megabytes). Run on the event loop it would stall every other request,
/health included, so it runs on a small pool of worker threads (the Rust tokenizer releases the
GIL while it encodes).

A prompt with more characters than ``max_model_len`` tokens could ever cover is refused at once,
without tokenizing it: no token of the vocabulary spells more than ``longest token`` characters,
so such a prompt has more tokens than the context holds.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from soarllm.errors import ContextLengthError

T = TypeVar("T")

DEFAULT_WORKERS = 2
_FALLBACK_TOKEN_CHARS = 64


def longest_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token can stand for.

    Vocabulary entries are spelled in the tokenizer's own alphabet (one symbol per byte for
    byte-level BPE, per character for SentencePiece, ``<0x41>`` for byte fallback), never with
    fewer symbols than the characters they decode to. A normalizer may merge characters before
    the model splits them (NFC composes ``e`` + accent into ``é``): allow twice as many then.
    """
    try:
        vocab = tokenizer.get_vocab()
        longest = max((len(t) for t in vocab), default=_FALLBACK_TOKEN_CHARS)
    except Exception:
        return _FALLBACK_TOKEN_CHARS
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(backend, "normalizer", None) is not None:
        longest *= 2
    return max(1, longest)


class TokenizerWorkers:
    """Runs tokenizer calls on worker threads; knows the longest prompt worth tokenizing."""

    def __init__(self, tokenizer: Any, max_model_len: int, workers: int = DEFAULT_WORKERS):
        self.max_model_len = max_model_len
        self.token_chars = longest_token_chars(tokenizer)
        self.max_prompt_chars = max_model_len * self.token_chars
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers),
                                        thread_name_prefix="soar-tokenizer")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def check_chars(self, num_chars: int, param: str, what: str = "the prompt") -> None:
        """Refuse text that cannot fit in the context whatever its tokens."""
        if num_chars > self.max_prompt_chars:
            raise ContextLengthError(
                f"{what} has {num_chars} characters; this model's maximum context length is "
                f"{self.max_model_len} tokens, and no text longer than {self.max_prompt_chars} "
                f"characters ({self.token_chars} per token at most) fits in it; shorten it",
                param=param,
            )

    def check_num_tokens(self, num_tokens: int, param: str) -> None:
        if num_tokens >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {num_tokens} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens (prompt plus at least one generated token); "
                "shorten the prompt",
                param=param,
            )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
