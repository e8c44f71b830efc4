from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from soarllm.bench.arrivals import LoadPoint, arrival_offsets
from soarllm.bench.metrics import TokenCheck, compute_metrics
from soarllm.bench.runner import RunResult
from soarllm.bench.sweep import find_capacity, load_points, refine_capacity


def test_all_at_once():
    assert arrival_offsets(4, math.inf) == [0.0] * 4


def test_poisson_gaps_are_exponential():
    gaps = np.diff(arrival_offsets(20001, request_rate=5.0, burstiness=1.0, seed=1))
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1


def test_gamma_burstiness_sets_the_variation():
    gaps = np.diff(arrival_offsets(20001, request_rate=5.0, burstiness=4.0, seed=1))
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(0.5, rel=0.05)  # CV = 1 / sqrt(shape)


def test_fixed_interval():
    assert arrival_offsets(3, 2.0, burstiness=math.inf) == pytest.approx([0.0, 0.5, 1.0])


def test_load_points_product():
    points = load_points([1.0, 2.0], [None, 4], 1.0)
    assert [p.label() for p in points] == ["rate=1/s", "rate=2/s", "c=4 rate=1/s", "c=4 rate=2/s"]
    assert LoadPoint().label() == "rate=inf"


def _run(rate: float, attainment: float) -> RunResult:
    metrics = compute_metrics([], duration_s=1.0)
    metrics.slo_attainment = attainment
    return RunResult("ep", LoadPoint(request_rate=rate), metrics, TokenCheck(), [])


def test_capacity_is_last_passing_rate_before_first_failure():
    runs = [_run(4, 0.85), _run(1, 1.0), _run(2, 0.95), _run(8, 0.95)]
    cap = find_capacity(runs)
    assert (cap.variable, cap.value, cap.first_failing, cap.lower_bound) == (
        "request_rate", 2, 4, False)
    assert cap.attainment == 0.95


def test_capacity_bounds():
    all_pass = find_capacity([_run(1, 1.0), _run(2, 0.9)])
    assert all_pass.value == 2 and all_pass.lower_bound
    none_pass = find_capacity([_run(1, 0.5)])
    assert none_pass.value is None and none_pass.first_failing == 1
    assert find_capacity([RunResult("ep", LoadPoint(1.0), compute_metrics([], 1.0),
                                    TokenCheck(), [])]) is None


def test_capacity_bisection():
    cap = find_capacity([_run(2, 0.95), _run(4, 0.5)])
    tried = []

    async def at_rate(rate: float) -> RunResult:
        tried.append(rate)
        return _run(rate, 0.95 if rate <= 3 else 0.5)

    runs: list[RunResult] = []
    refined = asyncio.run(refine_capacity(cap, at_rate, 2, runs))
    assert tried == [3.0, 3.5]
    assert (refined.value, refined.first_failing) == (3.0, 3.5)
    assert len(runs) == 2
