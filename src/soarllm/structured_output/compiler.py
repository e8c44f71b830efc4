"""Grammars compiled against the model's tokenizer, cached per grammar text (LRU).

A compiled grammar is an llguidance matcher in its start state; each request gets a copy of it
(``deep_copy`` costs about a microsecond; compiling, from a fraction of a millisecond to tens of
milliseconds for large schemas). The llguidance view of the tokenizer is built on first use (about
a second for a 50k vocabulary), so engines that never see a grammar never pay for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import llguidance
import llguidance.hf

from soarllm.sampling_params import StructuredOutputParams
from soarllm.structured_output.grammar import grammar_of, limits, problem

DEFAULT_CACHE_SIZE = 256  # compiled grammars kept


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int],
                 cache_size: int = DEFAULT_CACHE_SIZE):
        """``tokenizer``: a fast Hugging Face tokenizer, or an llguidance.LLTokenizer (tests
        build one over a hand-written vocabulary)."""
        self.tokenizer = tokenizer
        ll = tokenizer if isinstance(tokenizer, llguidance.LLTokenizer) else None
        # llguidance's vocabulary: the logits' width, or the tokenizer's if that is larger
        self.n_vocab = max(vocab_size, ll.vocab_size if ll is not None else len(tokenizer))
        self.eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = ll
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self.num_compiled = 0
        self.num_cache_hits = 0

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=self.n_vocab, eos_token=self.eos_token_ids or None)
        return self._ll_tokenizer

    def compile(self, params: StructuredOutputParams) -> llguidance.LLMatcher:
        """A fresh matcher (start state) for ``params``; InvalidRequestError when llguidance
        cannot enforce it."""
        key = (params.kind, params.spec)
        template = self._cache.get(key)
        if template is not None:
            self._cache.move_to_end(key)
            self.num_cache_hits += 1
            return template.deep_copy()
        template = llguidance.LLMatcher(self.ll_tokenizer, grammar_of(params), log_level=0,
                                        limits=limits())
        if template.is_error():
            raise problem(params, template.get_error())
        self.num_compiled += 1
        self._cache[key] = template
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return template.deep_copy()
