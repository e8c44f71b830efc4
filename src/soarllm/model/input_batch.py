"""The persistent input batch: one row of preallocated arrays per request the runner knows.

A request's row is filled once when it arrives (``add``), then updated from the step message's
deltas (new tokens, new blocks, computed count) and freed when it finishes or is preempted. Each
step's flat batch (token ids, positions, slot mapping, block tables) and its sampling parameters are
gathered from these rows with vectorized numpy, never by walking Python request objects.
"""

from __future__ import annotations

import numpy as np

from soarllm.sample.metadata import SamplingMetadata, build_sampling_metadata
from soarllm.sampling_params import SamplingParams
from soarllm.scheduler_output import CachedRequestData, NewRequestData

# Room past max_model_len for proposed (speculative) tokens written after a request's known tokens.
MAX_SPEC_TOKENS = 64


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, block_size: int):
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_num_blocks = -(-(max_model_len + MAX_SPEC_TOKENS) // block_size)
        self.req_ids: list[str | None] = []
        self.row_of: dict[str, int] = {}
        self.params: list[SamplingParams | None] = []
        self.eos_token_ids: list[tuple[int, ...]] = []
        self._free: list[int] = []
        self._alloc(max(1, max_num_reqs))

    def _alloc(self, rows: int) -> None:
        old = len(self.req_ids)
        width = self.max_model_len + MAX_SPEC_TOKENS

        def grow(name: str, shape: tuple[int, ...], dtype, fill=0) -> None:
            new = np.full(shape, fill, dtype=dtype)
            if old:
                new[:old] = getattr(self, name)
            setattr(self, name, new)

        grow("token_ids", (rows, width), np.int32)
        grow("num_tokens", (rows,), np.int64)  # known tokens (prompt + output), spec excluded
        grow("num_prompt_tokens", (rows,), np.int64)
        grow("num_computed_tokens", (rows,), np.int64)
        grow("block_table", (rows, self.max_num_blocks), np.int64)
        grow("num_blocks", (rows,), np.int64)
        grow("index", (rows,), np.int64)
        grow("temperature", (rows,), np.float32)
        grow("top_k", (rows,), np.int64)
        grow("top_p", (rows,), np.float32, 1.0)
        grow("min_p", (rows,), np.float32)
        grow("repetition_penalty", (rows,), np.float32, 1.0)
        grow("presence_penalty", (rows,), np.float32)
        grow("frequency_penalty", (rows,), np.float32)
        grow("min_tokens", (rows,), np.int64)
        grow("seed", (rows,), np.int64)
        grow("has_seed", (rows,), np.bool_)
        grow("greedy", (rows,), np.bool_)
        grow("num_logprobs", (rows,), np.int64, -1)  # -1: none
        grow("num_prompt_logprobs", (rows,), np.int64, -1)
        self.req_ids.extend([None] * (rows - old))
        self.params.extend([None] * (rows - old))
        self.eos_token_ids.extend([()] * (rows - old))
        self._free.extend(range(rows - 1, old - 1, -1))  # pop() hands out low rows first

    @property
    def num_reqs(self) -> int:
        return len(self.row_of)

    # -- rows -------------------------------------------------------------------------------------

    def add(self, new: NewRequestData) -> int:
        """Fill a row for a request (replacing any row it already had)."""
        n = len(new.token_ids)
        if n > self.max_model_len:
            raise ValueError(f"request {new.req_id} has {n} tokens > max_model_len")
        self.remove(new.req_id)
        if not self._free:
            self._alloc(2 * len(self.req_ids))
        r = self._free.pop()
        self.req_ids[r] = new.req_id
        self.row_of[new.req_id] = r
        self.token_ids[r, :n] = new.token_ids
        self.num_tokens[r] = n
        self.num_prompt_tokens[r] = new.num_prompt_tokens
        self.num_computed_tokens[r] = new.num_computed_tokens
        self.num_blocks[r] = 0
        self._append_blocks(r, new.block_ids)
        self.index[r] = new.index
        p = new.sampling_params
        self.params[r] = p
        self.eos_token_ids[r] = tuple(new.eos_token_ids)
        self.temperature[r] = p.temperature
        self.greedy[r] = p.greedy
        self.top_k[r] = p.top_k if p.top_k > 0 else 0
        self.top_p[r] = p.top_p
        self.min_p[r] = p.min_p
        self.repetition_penalty[r] = p.repetition_penalty
        self.presence_penalty[r] = p.presence_penalty
        self.frequency_penalty[r] = p.frequency_penalty
        self.min_tokens[r] = p.min_tokens
        self.has_seed[r] = p.seed is not None
        # request_seed works modulo 2**63, so any Python int seed fits an int64 row unchanged
        self.seed[r] = (p.seed or 0) % 2**63
        self.num_logprobs[r] = -1 if p.logprobs is None else p.logprobs
        self.num_prompt_logprobs[r] = -1 if p.prompt_logprobs is None else p.prompt_logprobs
        return r

    def update(self, cached: CachedRequestData) -> None:
        r = self.row_of[cached.req_id]
        if cached.new_token_ids:
            n0 = int(self.num_tokens[r])
            n1 = n0 + len(cached.new_token_ids)
            self.token_ids[r, n0:n1] = cached.new_token_ids
            self.num_tokens[r] = n1
        if cached.num_kept_blocks is not None:
            self.num_blocks[r] = cached.num_kept_blocks
        if cached.new_block_ids:
            self._append_blocks(r, cached.new_block_ids)
        self.num_computed_tokens[r] = cached.num_computed_tokens

    def remove(self, req_id: str) -> None:
        r = self.row_of.pop(req_id, None)
        if r is None:
            return
        self.req_ids[r] = None
        self.params[r] = None
        self._free.append(r)

    def _append_blocks(self, r: int, block_ids: list[int]) -> None:
        b0 = int(self.num_blocks[r])
        self.block_table[r, b0 : b0 + len(block_ids)] = block_ids
        self.num_blocks[r] = b0 + len(block_ids)

    def write_spec_tokens(self, r: int, spec: list[int]) -> None:
        n = int(self.num_tokens[r])
        self.token_ids[r, n : n + len(spec)] = spec

    def output_token_ids(self, r: int) -> np.ndarray:
        return self.token_ids[r, self.num_prompt_tokens[r] : self.num_tokens[r]]

    def all_token_ids(self, r: int) -> np.ndarray:
        return self.token_ids[r, : self.num_tokens[r]]


def sampling_metadata_for(requests: list[NewRequestData], vocab_size: int) -> SamplingMetadata:
    """Sampling metadata for a list of requests outside a runner (tests, tools)."""
    batch = InputBatch(len(requests), max(len(r.token_ids) for r in requests) + 1, block_size=16)
    rows = np.array([batch.add(r) for r in requests], dtype=np.int64)
    return build_sampling_metadata(batch, rows, vocab_size)
