"""The request timing and metrics against a fake server on 127.0.0.1 with known delays.

Lower bounds are exact (a token cannot arrive before the server sends it); upper bounds are
generous, since the machine may be busy.
"""

from __future__ import annotations

import asyncio

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
        assert len(r.itl) == N - 1
        assert TTFT <= r.ttft < TTFT + 0.4
        assert TPOT * 0.9 <= r.tpot < TPOT + 0.1
        assert r.latency >= TTFT + (N - 1) * TPOT
    assert TTFT * 1000 <= m.ttft_ms.mean < (TTFT + 0.4) * 1000
    assert TPOT * 900 <= m.tpot_ms.median < (TPOT + 0.1) * 1000
    assert TPOT * 900 <= m.itl_ms.median < (TPOT + 0.1) * 1000
    assert m.e2el_ms.mean >= (TTFT + (N - 1) * TPOT) * 1000
    # Two waves of two requests: at least two whole requests' time.
    assert m.duration_s >= 2 * (TTFT + (N - 1) * TPOT)
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
    # Arrivals follow the seeded schedule: the last one leaves after the first by their offset.
    from soarllm.bench.arrivals import arrival_offsets

    offsets = arrival_offsets(4, 10.0, 1.0, seed=3)
    span = max(state.arrivals) - min(state.arrivals)
    assert span >= offsets[-1] - 0.01
