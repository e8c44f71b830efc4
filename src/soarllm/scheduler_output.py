"""The step message: what the scheduler tells the model runner (through an executor) each step.

Plain data only, so it can cross a process boundary. A request is sent whole once (``NewRequestData``:
its tokens so far, sampling parameters and block table); after that each step carries only deltas
(``CachedRequestData``: tokens and blocks it gained since, and how many of its tokens are computed). The runner keeps its own
persistent copy of every request it has seen and drops it when the request's id appears in
``finished_req_ids`` or ``preempted_req_ids`` (a preempted request comes back later as new).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from soarllm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    token_ids: list[int]  # prompt + any output already generated (a resumed request)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is already in the cache (prefix-cache hit)
    index: int = 0  # choice index among the n siblings of one user request (seeds depend on it)
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class CachedRequestData:
    req_id: str
    new_token_ids: list[int]  # tokens appended since the runner last saw this request
    new_block_ids: list[int]  # blocks appended to its block table since then
    num_computed_tokens: int  # tokens whose KV is in the cache before this step
    # When the block table shrank since last sent (rejected draft slots given back): keep only the
    # first this-many blocks before appending new_block_ids. None: keep all.
    num_kept_blocks: int | None = None


@dataclass
class SpecLayout:
    """How a request's speculative tokens are laid out when they are not one chain of drafts
    (lookahead decoding: guessed n-grams to verify and a Jacobi window, in one row).

    Row index 0 is the request's last known token; rows 1.. are its spec tokens, stored in the KV
    cache in row order right after it. ``positions`` are the rotary positions relative to row 0,
    ``mask[i][j]`` whether row i attends to row j (every row sees the whole cached prefix),
    ``candidates`` the rows of each guessed continuation, in order (verified like drafts: the
    first candidate whose tokens match what the model samples wins), and ``window_rows`` the rows
    whose greedy next tokens go back to the proposer (not emitted)."""

    positions: list[int]
    mask: np.ndarray  # bool [T, T]
    candidates: list[list[int]]
    window_rows: list[int]


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # request id -> tokens computed this step (prompt chunk, 1, or 1 + number of spec tokens),
    # in scheduling order
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # request id -> proposed tokens to verify this step (part of its num_scheduled_tokens)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # request id -> layout of its spec tokens when they are not a chain of drafts (lookahead)
    spec_layouts: dict[str, SpecLayout] = field(default_factory=dict)
    finished_req_ids: list[str] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)
    # Structured output: the requests that sample this step under a grammar, and the tokens each
    # may sample, packed: int32 [len(grammar_req_ids), ceil(V / 32)], bit j of word w allows
    # token 32 * w + j (row i belongs to grammar_req_ids[i]); None when no request has a grammar.
    grammar_req_ids: list[str] = field(default_factory=list)
    grammar_bitmask: np.ndarray | None = None

    def grammar_of(self, req_id: str) -> tuple[list[str], np.ndarray | None]:
        """The grammar fields of a step reduced to ``req_id`` (its row, if it has one)."""
        if req_id not in self.grammar_req_ids:
            return [], None
        i = self.grammar_req_ids.index(req_id)
        return [req_id], self.grammar_bitmask[i : i + 1]

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens
