"""Metric definitions against hand-computed values (vLLM's serving-benchmark definitions)."""

from __future__ import annotations

import pytest

from soarllm.bench.client import RequestResult
from soarllm.bench.metrics import SLO, check_token_counts, compute_metrics, peak_concurrency
from soarllm.errors import InvalidRequestError


def _results() -> list[RequestResult]:
    return [
        RequestResult(success=True, start_time=0.0, ttft=0.1, latency=0.5, output_tokens=5,
                      itl=[0.1, 0.1, 0.1, 0.1], prompt_len=10),
        RequestResult(success=True, start_time=0.2, ttft=0.3, latency=1.3, output_tokens=3,
                      itl=[0.5, 0.5], prompt_len=20),
        RequestResult(success=True, start_time=0.4, ttft=0.2, latency=0.2, output_tokens=1,
                      itl=[], prompt_len=30),
        RequestResult(success=False, start_time=0.5, error="HTTP 500"),
    ]


def test_throughput_and_counts():
    m = compute_metrics(_results(), duration_s=2.0)
    assert (m.num_requests, m.completed, m.failed) == (4, 3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 9)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(34.5)
    assert m.mean_output_len == pytest.approx(3.0)
    assert m.request_goodput is None and m.slo_attainment is None


def test_latency_distributions():
    m = compute_metrics(_results(), duration_s=2.0, percentiles=(50, 90, 99))
    # TTFT over successful requests: 100, 300, 200 ms.
    assert m.ttft_ms.mean == pytest.approx(200)
    assert m.ttft_ms.median == pytest.approx(200)
    assert m.ttft_ms.percentiles["p90"] == pytest.approx(280)  # 200 + 0.8 * 100
    assert m.ttft_ms.percentiles["p99"] == pytest.approx(298)
    # TPOT excludes the first token and requests with a single token: (0.5-0.1)/4, (1.3-0.3)/2.
    assert m.tpot_ms.count == 2
    assert m.tpot_ms.mean == pytest.approx(300)
    assert m.tpot_ms.percentiles["p90"] == pytest.approx(460)
    # ITL pools every gap: four of 100 ms and two of 500 ms.
    assert m.itl_ms.count == 6
    assert m.itl_ms.mean == pytest.approx(1400 / 6)
    assert m.itl_ms.median == pytest.approx(100)
    assert m.e2el_ms.mean == pytest.approx(2000 / 3)
    assert m.e2el_ms.median == pytest.approx(500)
    assert m.peak_concurrency == 3


def test_goodput_and_attainment():
    slo = SLO.parse("ttft=250,tpot=200")
    m = compute_metrics(_results(), duration_s=2.0, slo=slo)
    # Request 1 meets both; request 2 misses TTFT; request 3 has one token (TPOT counts as 0);
    # the failed request misses.
    assert m.request_goodput == pytest.approx(1.0)
    assert m.slo_attainment == pytest.approx(0.5)
    assert SLO.parse("e2el=400").met_by(_results()[0]) is False


def test_slo_parse_errors():
    assert SLO.parse("ttft=500, tpot=50") == SLO(ttft_ms=500, tpot_ms=50)
    assert SLO.parse(None) is None
    for bad in ("ttft", "latency=3", "tpot=abc", "ttft=-1"):
        with pytest.raises(InvalidRequestError):
            SLO.parse(bad)


def test_peak_concurrency_half_open():
    back_to_back = [
        RequestResult(success=True, start_time=0.0, latency=1.0),
        RequestResult(success=True, start_time=1.0, latency=1.0),
    ]
    assert peak_concurrency(back_to_back) == 1


def test_token_check():
    rs = [
        RequestResult(success=True, usage_output_tokens=10, local_output_tokens=10),
        RequestResult(success=True, usage_output_tokens=10, local_output_tokens=12),
        RequestResult(success=True, usage_output_tokens=None, local_output_tokens=5),
    ]
    check = check_token_counts(rs)
    assert (check.requests_with_usage, check.requests_compared, check.mismatched) == (2, 2, 1)
    assert check.mean_abs_diff == pytest.approx(1.0)
    assert check.max_abs_diff == 2


def test_empty_run_is_all_zero():
    m = compute_metrics([RequestResult(success=False)], duration_s=1.0, slo=SLO(ttft_ms=1))
    assert m.completed == 0 and m.ttft_ms.mean == 0 and m.slo_attainment == 0
