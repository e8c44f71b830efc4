"""The request timing and metrics against a fake server on 127.0.0.1 with known delays.

Only lower bounds are certain (a token cannot arrive before the server sends it, however busy the
machine); everything else is checked as an ordering of events or against numpy's statistics of the
per-request records. No upper bound on a duration is asserted.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from soarllm.bench.arrivals import LoadPoint
from soarllm.bench.client import Endpoint
from soarllm.bench.metrics import SLO
from soarllm.bench.runner import run_load_point
from soarllm.bench.workloads import SampleRequest
from tests.bench.chartok import CharTokenizer
from tests.bench.fake_server import FakeConfig, running_server

TTFT, TPOT, N = 0.2, 0.05, 6


def _requests(n: int, api: str = "completions", output_len: int = N) -> list[SampleRequest]:
    prompt = "hello there" if api == "completions" else [{"role": "user", "content": "hi"}]
    return [SampleRequest(prompt, 11, output_len, "test") for _ in range(n)]


def test_known_delays_completions():
    with running_server(FakeConfig(ttft_s=TTFT, tpot_s=TPOT)) as (url, state):
        run = asyncio.run(run_load_point(
            Endpoint(url, "fake"), _requests(4), LoadPoint(max_concurrency=2),
            slo=SLO(ttft_ms=5000, tpot_ms=5000), tokenizer=CharTokenizer(), warmup=0,
            progress=False,
        ))
    m = run.metrics
    assert m.completed == 4 and m.failed == 0
    assert state.peak_in_flight <= 2
    for r in run.requests:
        assert r.output_tokens == N and r.output_tokens_source == "usage"
        assert r.prompt_len == 7  # the server's usage overrides our count
        assert len(r.itl) == N - 1 and all(gap >= 0 for gap in r.itl)
        assert r.ttft >= TTFT  # the server sleeps TTFT before the first token
        # the last token comes after every injected delay, and before the stream ends
        last_token = r.ttft + sum(r.itl)
        assert TTFT + (N - 1) * TPOT <= last_token <= r.latency
        assert r.tpot == pytest.approx((r.latency - r.ttft) / (N - 1))
    ttfts = [r.ttft for r in run.requests]
    assert m.ttft_ms.mean == pytest.approx(1000 * np.mean(ttfts))
    assert m.ttft_ms.percentiles["p99"] == pytest.approx(1000 * np.percentile(ttfts, 99))
    assert m.tpot_ms.median == pytest.approx(1000 * np.median([r.tpot for r in run.requests]))
    assert m.itl_ms.median == pytest.approx(
        1000 * np.median([g for r in run.requests for g in r.itl]))
    assert m.e2el_ms.mean >= (TTFT + (N - 1) * TPOT) * 1000
    # Two waves of two requests: at least two whole requests' time.
    assert m.duration_s >= 2 * (TTFT + (N - 1) * TPOT)
    # At most two in flight: each request after the second is sent after an earlier one ended.
    spans = sorted((r.start_time, r.start_time + r.latency) for r in run.requests)
    for i, (start, _) in enumerate(spans[2:], start=2):
        assert sum(end <= start for _, end in spans[:i]) >= i - 1
    assert m.output_throughput == pytest.approx(4 * N / m.duration_s)
    assert m.slo_attainment == 1.0
    assert run.token_check.requests_compared == 4
    payload = state.payloads[0]
    assert payload["stream"] is True and payload["ignore_eos"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert payload["max_tokens"] == N


def test_chat_role_chunk_is_not_the_first_token():
    with running_server(FakeConfig(ttft_s=TTFT, tpot_s=0.01)) as (url, _):
        run = asyncio.run(run_load_point(
            Endpoint(url, "fake", api="chat"), _requests(2, "chat", 3), LoadPoint(),
            progress=False, warmup=0,
        ))
    assert all(r.success and r.ttft >= TTFT for r in run.requests)
    assert all(r.generated_text == " t0 t1 t2" for r in run.requests)


def test_counts_without_usage():
    with running_server(FakeConfig(ttft_s=0.01, tpot_s=0.01, usage=False)) as (url, _):
        ep = Endpoint(url, "fake")
        counted = asyncio.run(run_load_point(
            ep, _requests(1, output_len=3), LoadPoint(), tokenizer=CharTokenizer(),
            progress=False, warmup=0))
        chunks = asyncio.run(run_load_point(
            ep, _requests(1, output_len=3), LoadPoint(), progress=False, warmup=0))
    r = counted.requests[0]
    assert r.output_tokens_source == "tokenizer" and r.output_tokens == len(" t0 t1 t2")
    assert r.usage_output_tokens is None
    r = chunks.requests[0]
    assert r.output_tokens_source == "chunks" and r.output_tokens == 3


def test_request_rate_spreads_arrivals_and_errors_are_failures():
    with running_server(FakeConfig(ttft_s=0.01, tpot_s=0.01)) as (url, state):
        run = asyncio.run(run_load_point(
            Endpoint(url, "fake"), _requests(3, output_len=2) + _requests(1, output_len=-1),
            LoadPoint(request_rate=10.0), progress=False, warmup=0, seed=3,
        ))
    assert run.metrics.completed == 3 and run.metrics.failed == 1
    failed = [r for r in run.requests if not r.success]
    assert failed[0].error.startswith("HTTP 400")
    # Arrivals follow the seeded schedule: no request is sent before its offset (a loaded machine
    # may send it later, never earlier), and the server saw every one of them.
    from soarllm.bench.arrivals import arrival_offsets

    offsets = arrival_offsets(4, 10.0, 1.0, seed=3)
    assert offsets[-1] > 0 and sorted(offsets) == list(offsets)
    assert all(r.start_time >= off for r, off in zip(run.requests, offsets))
    assert len(state.arrivals) == 4
