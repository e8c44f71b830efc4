"""From an API request to engine requests and back: admission (--max-waiting, then the caller's
rate limits), one tracked engine request per prompt, per-request metrics and per-key usage, and
reading several engine requests as one stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from soarllm.engine.async_engine import RequestStream
from soarllm.errors import OverloadedError
from soarllm.outputs import RequestOutput
from soarllm.sampling_params import SamplingParams
from soarllm.serve.rate_limit import Grant, RateLimitExceeded
from soarllm.serve.state import ServerState
from soarllm.serve.usage import caller


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class PromptInput:
    """One prompt as the engine gets it, plus the text to echo back."""

    token_ids: list[int]
    text: str


class TrackedRequest:
    """One engine request: its output stream plus the metrics it records as outputs arrive."""

    def __init__(self, state: ServerState, stream: RequestStream, arrival: float,
                 num_prompt_tokens: int, key_name: str | None = None,
                 on_end: Callable[[int], None] | None = None):
        self._state = state
        self._key_name = key_name  # charged with the tokens generated
        self._on_end = on_end  # called once with prompt + generated tokens
        self._stream = stream
        self.request_id = stream.request_id
        self.arrival = arrival
        self.num_prompt_tokens = num_prompt_tokens
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_generated = 0
        self.final: RequestOutput | None = None
        self._closed = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        output = await self._stream.__anext__()
        self._observe(output)
        return output

    def _observe(self, output: RequestOutput) -> None:
        metrics = self._state.metrics
        now = time.time()
        new_tokens = sum(len(c.delta_token_ids) for c in output.outputs)
        if new_tokens:
            if self.first_token_time is None:
                self.first_token_time = now
                metrics.observe_first_token(now - self.arrival)
                metrics.observe_prompt(self.num_prompt_tokens)
                metrics.observe_tokens(new_tokens, None)
            else:
                metrics.observe_tokens(new_tokens, now - (self.last_token_time or now))
            self.last_token_time = now
            self.num_generated += new_tokens
            if self._key_name is not None:
                self._state.usage.add_completion_tokens(self._key_name, new_tokens)
        if output.finished:
            self.final = output
            reason = output.outputs[0].finish_reason if output.outputs else None
            self._record_end(reason or "stop", now)

    def _record_end(self, reason: str, now: float) -> None:
        if self._closed:
            return
        self._closed = True
        tpot = None
        per_seq = self.num_generated / max(1, len(self.final.outputs) if self.final else 1)
        if self.first_token_time is not None and self.last_token_time and per_seq > 1:
            tpot = (self.last_token_time - self.first_token_time) / (per_seq - 1)
        self._state.metrics.observe_finished(
            reason, now - self.arrival, self.num_prompt_tokens, self.num_generated, tpot
        )
        if self._on_end is not None:
            self._on_end(self.num_prompt_tokens + self.num_generated)

    async def collect(self) -> RequestOutput:
        """Run to the end; return the last (cumulative) output."""
        last = None
        async for output in self:
            last = output
        if last is None or not last.finished:
            raise RuntimeError(f"request {self.request_id} ended without a final output")
        return last

    def close(self) -> None:
        """Abort in the engine if unfinished (client gone, error elsewhere). Idempotent."""
        if self.final is None:
            self._record_end("abort", time.time())
        self._stream.close()


def check_admission(state: ServerState) -> None:
    limit = state.config.max_waiting
    if limit is not None and state.engine.num_waiting >= limit:
        state.metrics.observe_rejected("overloaded")
        raise OverloadedError(
            f"the server is overloaded: {state.engine.num_waiting} requests are waiting "
            f"(limit {limit}); retry in {state.config.retry_after_s} s",
            retry_after=state.config.retry_after_s,
        )


def check_rate_limits(state: ServerState, key_name: str, prompts: list[PromptInput],
                      params: SamplingParams) -> Grant | None:
    """The caller's rpm / tpm limits; tokens reserved per prompt as prompt + n x max_tokens."""
    if not state.limiter.enabled:
        return None
    costs = [len(p.token_ids) + params.n * (
        params.max_tokens or max(1, state.max_model_len - len(p.token_ids))) for p in prompts]
    try:
        return state.limiter.admit(key_name, costs)
    except RateLimitExceeded as e:
        state.usage.add_rate_limited(key_name, e.limit)
        state.metrics.observe_rejected("rate_limited")
        raise


async def submit(
    state: ServerState, request_id: str, prompts: list[PromptInput], params: SamplingParams,
    coalesce: bool = True,
) -> list[TrackedRequest]:
    """Queue one engine request per prompt (ids ``request_id-i``); all or none are accepted.

    The prompts are handed to the engine together (one engine step sees them all)."""
    arrival = time.time()
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    # Admission and submission in one synchronous block: no other request can be admitted
    # between the check and the moment these count as queued.
    check_admission(state)
    key_name = caller().name
    grant = check_rate_limits(state, key_name, prompts, params)
    submitted: list[tuple[Any, Any]] = []
    try:
        for rid, prompt in zip(ids, prompts):
            submitted.append(state.engine.submit_request(
                rid, prompt.token_ids, params, arrival_time=arrival, coalesce=coalesce))
    except BaseException:
        for stream, _ in submitted:
            stream.close()
        if grant is not None:
            grant.refund()
        raise
    adds = [asyncio.ensure_future(state.engine.wait_accepted(stream, accepted))
            for stream, accepted in submitted]
    try:
        await asyncio.wait(adds)
    except BaseException:  # cancelled: close every stream, accepted or not (idempotent)
        for a in adds:
            a.cancel()
        for stream, _ in submitted:
            stream.close()
        if grant is not None:
            grant.refund()
        raise
    errors = [a.exception() for a in adds if a.exception() is not None]
    if errors:
        for a in adds:
            if a.exception() is None:
                a.result().close()
        if grant is not None:
            grant.refund()
        raise errors[0]
    state.usage.add_request(key_name, sum(len(p.token_ids) for p in prompts))
    return [TrackedRequest(state, a.result(), arrival, len(p.token_ids), key_name,
                           (lambda used, i=i: grant.settle(i, used)) if grant else None)
            for i, (a, p) in enumerate(zip(adds, prompts))]


async def interleave(
    requests: list[TrackedRequest],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) pairs from several engine requests, in arrival order."""
    if len(requests) == 1:
        async for output in requests[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, req: TrackedRequest) -> None:
        try:
            async for output in req:
                await queue.put((i, output))
            await queue.put((i, None))
        except BaseException as e:  # re-raised in the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(requests)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def close_all(requests: list[TrackedRequest]) -> None:
    for r in requests:
        r.close()
