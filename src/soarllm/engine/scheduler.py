"""Continuous batching: each step picks, under a token budget, how many new tokens every request
computes (a whole prompt, a prompt chunk, one decode token, or 1 + k speculative tokens).

Running requests go first (FCFS), then waiting ones while the budget and ``max_num_seqs`` allow.
When the KV pool runs dry the newest running request is preempted: its blocks are freed and it is
recomputed later from its prompt and the tokens it already generated, so nothing is lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from soarllm.config import SchedulerConfig
from soarllm.engine.kv_cache_manager import KVCacheManager
from soarllm.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, from request.num_computed_tokens on
    spec_token_ids: list[int]  # proposed tokens to verify (part of num_new_tokens)
    block_ids: list[int]  # the request's whole block table

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens, so a next token is sampled."""
        return self.start + self.num_new_tokens >= self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_ids: list[str] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                preempted = True
                if victim is req:
                    break
            else:
                spec = req.spec_token_ids[: max(0, n - (req.num_tokens - req.num_computed_tokens))]
                out.scheduled.append(
                    ScheduledRequest(req, n, spec, self.kv.block_ids(req.request_id))
                )
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: it was the newest, nothing after it runs

        if not preempted:
            self._admit_waiting(out, budget)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            if req.fork_of is not None and not _leader_ready(req):
                skipped.append(req)  # waits for the leader's prompt blocks
                continue
            computed, num_cached = [], 0
            if req.num_computed_tokens == 0:
                computed, num_cached = self.kv.get_computed_blocks(req)
            remaining = req.num_tokens - req.num_computed_tokens - num_cached
            if remaining > budget and not self.config.enable_chunked_prefill:
                self.waiting.appendleft(req)
                break
            n = min(remaining, budget)
            if not self.kv.allocate_slots(req, n, computed):
                self.waiting.appendleft(req)
                break
            if req.status == RequestStatus.WAITING:
                req.metrics.num_cached_tokens = num_cached
            req.num_computed_tokens += num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, [], self.kv.block_ids(req.request_id)))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Mark a request finished (or aborted) and give its blocks back."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free(req)
        self._finished_ids.append(req.request_id)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance each scheduled request past the tokens it just computed."""
        for s in out.scheduled:
            if s.request.status == RequestStatus.RUNNING:
                s.request.num_computed_tokens += s.num_new_tokens - len(s.spec_token_ids)
                s.request.spec_token_ids = []


def _leader_ready(req: Request) -> bool:
    leader = req.fork_of
    return leader.is_finished or leader.num_computed_tokens >= leader.num_prompt_tokens
