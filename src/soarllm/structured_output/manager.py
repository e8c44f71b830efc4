"""StructuredOutputManager: the engine's side of structured output.

It keeps one llguidance matcher per request that has a grammar, advances it with every token the
request appends (``accept_token``, which says when the grammar is complete), and before each step
fills the packed bitmask of the tokens that each scheduled request may sample next
(``fill_bitmask``): an int32 array [num_grammar_reqs, ceil(V / 32)] (V: the larger of the
logits' width and the tokenizer's vocabulary), bit j of word w allowing
token 32 * w + j, sent in the step message with the request ids in row order. Only requests that
sample this step get a row (not those in the middle of a prompt chunk).

A grammar request never speculates (spec/speculator.py), so its row masks exactly one sampled
position.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np

from soarllm.sampling_params import SamplingParams
from soarllm.scheduler_output import SchedulerOutput
from soarllm.structured_output.compiler import DEFAULT_CACHE_SIZE, GrammarCompiler

logger = logging.getLogger(__name__)


class GrammarViolationError(RuntimeError):
    """A token the grammar does not allow was appended (a masking bug, never the user's)."""


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int],
                 cache_size: int = DEFAULT_CACHE_SIZE):
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids, cache_size)
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._executor: llguidance.LLExecutor | None = None

    @property
    def bitmask_width(self) -> int:
        return (self.compiler.n_vocab + 31) // 32

    def add_requests(self, request_ids: list[str], params: SamplingParams) -> None:
        """Compile the request's grammar (cached) and give each of its sequences a matcher;
        InvalidRequestError when it cannot be enforced. Nothing to do without a grammar."""
        so = params.structured_outputs
        if so is None:
            return
        matcher = self.compiler.compile(so)
        for i, rid in enumerate(request_ids):
            self._matchers[rid] = matcher if i == 0 else matcher.deep_copy()

    @property
    def num_requests(self) -> int:
        """Sequences holding a matcher (finished and aborted ones are released)."""
        return len(self._matchers)

    def has_grammar(self, request_id: str) -> bool:
        return request_id in self._matchers

    def accept_token(self, request_id: str, token_id: int) -> bool:
        """Advance the request's matcher; True when its grammar is complete (nothing may follow).
        False for a request without a grammar."""
        m = self._matchers.get(request_id)
        if m is None:
            return False
        if m.is_stopped():
            # Nothing may follow (the mask allowed only the end token): complete, or a dead end
            # where no token of this vocabulary can continue the grammar. Either way: stop.
            if not m.is_accepting():
                logger.warning("request %s: its grammar cannot be continued with this "
                               "model's tokens (%s); stopping it", request_id, m.stop_reason())
            return True
        if not m.consume_token(token_id):
            raise GrammarViolationError(
                f"token {token_id} does not satisfy the request's grammar: {m.get_error()}")
        return m.is_stopped()

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def fill_bitmask(self, so: SchedulerOutput, scheduled: list[Any]) -> None:
        """Set ``so.grammar_req_ids`` and ``so.grammar_bitmask`` for the scheduled requests
        (engine Requests, in ``so``'s order) that have a grammar and sample this step."""
        if not self._matchers:
            return
        ids: list[str] = []
        for req in scheduled:
            rid = req.request_id
            if rid not in self._matchers:
                continue
            spec = so.spec_token_ids.get(rid)
            if spec:
                raise RuntimeError(f"request {rid} has a grammar and must not verify drafts")
            if req.num_computed_tokens + so.num_scheduled_tokens[rid] >= req.num_tokens:
                ids.append(rid)
        if not ids:
            return
        bitmask = np.empty((len(ids), self.bitmask_width), dtype=np.int32)
        if len(ids) == 1:
            llguidance.numpy.fill_next_token_bitmask(self._matchers[ids[0]], bitmask, 0)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            llguidance.numpy.fill_next_token_bitmask_par(
                self._executor, [(self._matchers[rid], i) for i, rid in enumerate(ids)], bitmask)
        so.grammar_req_ids = ids
        so.grammar_bitmask = bitmask
