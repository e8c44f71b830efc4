"""One load point against one endpoint: send every request on its schedule, then measure."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from soarllm.bench.arrivals import LoadPoint, arrival_offsets
from soarllm.bench.client import Endpoint, RequestResult, first_model, send_request
from soarllm.bench.metrics import (
    DEFAULT_PERCENTILES,
    SLO,
    BenchmarkMetrics,
    TokenCheck,
    check_token_counts,
    compute_metrics,
)
from soarllm.bench.workloads import SampleRequest


@dataclass
class RunResult:
    endpoint: str  # the endpoint's label
    load: LoadPoint
    metrics: BenchmarkMetrics
    token_check: TokenCheck
    requests: list[RequestResult]  # start_time is relative to the run's start


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _count_locally(results: list[RequestResult], tokenizer: Any) -> None:
    """Our tokenizer's output counts (after the clock stopped, so it costs the run nothing)."""
    if tokenizer is None:
        return
    for r in results:
        if not r.success:
            continue
        r.local_output_tokens = len(tokenizer.encode(r.generated_text, add_special_tokens=False))
        if r.output_tokens_source != "usage":
            r.output_tokens, r.output_tokens_source = r.local_output_tokens, "tokenizer"


async def run_load_point(
    endpoint: Endpoint,
    requests: list[SampleRequest],
    load: LoadPoint,
    *,
    slo: SLO | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    warmup: int = 0,
    progress: bool = True,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
    timeout_s: float = 3600.0,
) -> RunResult:
    limit = load.max_concurrency or len(requests)
    limits = httpx.Limits(max_connections=limit + 1, max_keepalive_connections=limit + 1)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = await first_model(client, endpoint)
        for request in requests[:warmup]:
            await send_request(client, endpoint, request, model)

        offsets = arrival_offsets(len(requests), load.request_rate, load.burstiness, seed)
        slots = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
        bar = _progress(len(requests), f"{endpoint.label} {load.label()}", progress)
        start = time.perf_counter()

        async def one(request: SampleRequest, offset: float) -> RequestResult:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            arrived = time.perf_counter()
            if slots is None:
                result = await send_request(client, endpoint, request, model)
            else:
                async with slots:
                    result = await send_request(client, endpoint, request, model)
            result.queue_time = result.start_time - arrived
            bar.update(1)
            return result

        results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
        duration = time.perf_counter() - start
        bar.close()

    for r in results:
        r.start_time -= start
    _count_locally(results, tokenizer)
    metrics = compute_metrics(results, duration, slo, percentiles)
    return RunResult(endpoint.label, load, metrics, check_token_counts(results), results)
