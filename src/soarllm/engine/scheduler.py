"""Continuous batching: each step picks, under a token budget, how many new tokens every request
computes (a whole prompt, a prompt chunk, one decode token, or 1 + k speculative tokens).

Running requests go first (FCFS), then waiting ones while the budget and ``max_num_seqs`` allow.
When the KV pool runs dry the newest running request is preempted: its blocks are freed and it is
recomputed later from its prompt and the tokens it already generated, so nothing is lost.
"""

from __future__ import annotations

from collections import deque

from soarllm.config import SchedulerConfig
from soarllm.engine.kv_cache_manager import KVCacheManager
from soarllm.engine.request import Request, RequestStatus
from soarllm.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        # What the runner holds of each request it has seen: (tokens, blocks) sent so far.
        self._sent: dict[str, tuple[int, int]] = {}
        self._trimmed: set[str] = set()  # block tables shortened since last sent
        self._scheduled: dict[str, Request] = {}  # the last step's requests, by id

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_ids)
        self._finished_ids = []
        self._scheduled = {}
        budget = self.config.max_num_batched_tokens
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            want = req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens
            n = min(want, budget)
            if req.spec_layout is not None and n < want:
                req.spec_token_ids, req.spec_layout = [], None  # a laid-out row is all or nothing
                n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(req, n):
                if req.spec_token_ids:  # drafts never cost another request its blocks
                    req.spec_token_ids, req.spec_layout = [], None
                    n = min(req.num_tokens - req.num_computed_tokens, budget)
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_req_ids.append(victim.request_id)
                preempted = True
                if victim is req:
                    break
            else:
                spec = req.spec_token_ids[: max(0, n - (req.num_tokens - req.num_computed_tokens))]
                self._add_to_step(out, req, n, spec)
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
            self._add_to_step(out, req, n, [])
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _add_to_step(self, out: SchedulerOutput, req: Request, n: int, spec: list[int]) -> None:
        """Schedule n tokens of req: sent whole the first time, as deltas afterwards."""
        rid = req.request_id
        out.num_scheduled_tokens[rid] = n
        if spec:
            out.spec_token_ids[rid] = spec
            if req.spec_layout is not None:
                out.spec_layouts[rid] = req.spec_layout
        blocks = self.kv.block_ids(rid)
        sent = self._sent.get(rid)
        if sent is None:
            out.new_reqs.append(new_request_data(req, blocks))
        else:
            ntok, nblk = sent
            kept = nblk if rid in self._trimmed else None
            self._trimmed.discard(rid)
            out.cached_reqs.append(CachedRequestData(
                rid, req.all_token_ids[ntok:], blocks[nblk:], req.num_computed_tokens, kept
            ))
        self._sent[rid] = (req.num_tokens, len(blocks))
        self._scheduled[rid] = req

    def _preempt(self, req: Request) -> None:
        self._sent.pop(req.request_id, None)
        self._trimmed.discard(req.request_id)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids, req.spec_layout = [], None
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
        self._sent.pop(req.request_id, None)
        self._trimmed.discard(req.request_id)
        self._finished_ids.append(req.request_id)

    def scheduled_request(self, request_id: str) -> Request:
        return self._scheduled[request_id]

    def update_after_step(self, out: SchedulerOutput,
                          num_accepted: dict[str, int] | None = None) -> None:
        """Advance each scheduled request past the tokens it just computed: its known tokens and
        the drafts the verifier accepted (their KV is written and right). Blocks that only rejected
        drafts used go back to the pool."""
        for rid, n in out.num_scheduled_tokens.items():
            req = self._scheduled[rid]
            if req.status != RequestStatus.RUNNING:
                continue
            num_spec = len(out.spec_token_ids.get(rid, ()))
            accepted = num_accepted.get(rid, 0) if num_accepted else 0
            req.num_computed_tokens += n - num_spec + accepted
            req.spec_token_ids, req.spec_layout = [], None
            if num_spec > accepted:
                # the next step computes one token (the one emitted after the accepted drafts)
                kept = self.kv.trim(req, req.num_computed_tokens + 1)
                ntok, nblk = self._sent.get(rid, (0, 0))
                if kept < nblk:
                    self._sent[rid] = (ntok, kept)
                    self._trimmed.add(rid)


def new_request_data(req: Request, block_ids: list[int]) -> NewRequestData:
    """Everything the runner needs to know about a request it has not seen (or has lost)."""
    return NewRequestData(
        req.request_id, list(req.all_token_ids), req.num_prompt_tokens, req.params,
        list(block_ids), req.num_computed_tokens, req.index, tuple(sorted(req.eos_token_ids)),
    )


def _leader_ready(req: Request) -> bool:
    leader = req.fork_of
    return leader.is_finished or leader.num_computed_tokens >= leader.num_prompt_tokens
