"""Load sweeps, and capacity in DistServe's sense.

Capacity is the highest request rate at which at least ``target`` (90%) of the requests meet the
SLO. It is read off a sweep of request rates: the highest swept rate that passes with every lower
rate passing too, optionally refined by bisection between it and the first rate that fails.
For a sweep over concurrency (no rate), the same reading gives the highest passing concurrency.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from soarllm.bench.arrivals import LoadPoint
from soarllm.bench.runner import RunResult

CAPACITY_TARGET = 0.9


@dataclass
class Capacity:
    variable: str  # "request_rate" (req/s) or "max_concurrency"
    value: float | None  # None: no swept point met the target
    attainment: float | None  # SLO attainment measured at ``value``
    target: float = CAPACITY_TARGET
    first_failing: float | None = None  # the lowest swept value that missed the target
    lower_bound: bool = False  # True when every point passed: capacity is at least ``value``


def load_points(
    rates: list[float], concurrencies: list[int | None], burstiness: float
) -> list[LoadPoint]:
    """The cartesian product of the swept rates and concurrency caps, in sweep order."""
    return [
        LoadPoint(request_rate=r, max_concurrency=c, burstiness=burstiness)
        for c in concurrencies
        for r in rates
    ]


def _variable(runs: list[RunResult]) -> str:
    if len({r.load.request_rate for r in runs}) > 1 or all(
        math.isfinite(r.load.request_rate) for r in runs
    ):
        return "request_rate"
    return "max_concurrency"


def _value(run: RunResult, variable: str) -> float:
    v = run.load.request_rate if variable == "request_rate" else run.load.max_concurrency
    return math.inf if v is None else float(v)


def find_capacity(runs: list[RunResult], target: float = CAPACITY_TARGET) -> Capacity | None:
    """Capacity from runs measured with an SLO; None when no run carries an SLO attainment."""
    measured = [r for r in runs if r.metrics.slo_attainment is not None]
    if not measured:
        return None
    variable = _variable(measured)
    measured.sort(key=lambda r: _value(r, variable))
    best: RunResult | None = None
    first_failing = None
    for run in measured:
        if run.metrics.slo_attainment >= target:
            best = run
        else:
            first_failing = _value(run, variable)
            break
    return Capacity(
        variable=variable,
        value=None if best is None else _value(best, variable),
        attainment=None if best is None else best.metrics.slo_attainment,
        target=target,
        first_failing=first_failing,
        lower_bound=first_failing is None,
    )


async def refine_capacity(
    capacity: Capacity,
    run_at_rate: Callable[[float], Awaitable[RunResult]],
    steps: int,
    runs: list[RunResult],
) -> Capacity:
    """Bisect the request rate between the last passing and the first failing swept rate."""
    if (
        capacity.variable != "request_rate"
        or capacity.value is None
        or capacity.first_failing is None
        or steps <= 0
    ):
        return capacity
    low, high, attainment = capacity.value, capacity.first_failing, capacity.attainment
    for _ in range(steps):
        mid = (low + high) / 2
        run = await run_at_rate(mid)
        runs.append(run)
        if run.metrics.slo_attainment is not None and run.metrics.slo_attainment >= capacity.target:
            low, attainment = mid, run.metrics.slo_attainment
        else:
            high = mid
    return Capacity(capacity.variable, low, attainment, capacity.target, high, False)
