"""Serving metrics, defined as vLLM's serving benchmark defines them.

For each successful request (client clock, seconds):

* TTFT  = time from sending the request to receiving the first token chunk.
* E2EL  = time from sending the request to the end of the response.
* TPOT  = (E2EL - TTFT) / (output tokens - 1), i.e. excluding the first token; requests with at
  most one output token have no TPOT (they count as TPOT = 0 when judged against an SLO).
* ITL   = every gap between two consecutive token chunks, pooled over all requests (a chunk that
  carries several tokens is one gap, so ITL >= TPOT when servers batch tokens into chunks).

Distributions report mean, median, standard deviation and percentiles (linear interpolation, as
``numpy.percentile``). Over the run (duration = first send to last completion):

* request throughput = completed requests / duration;
* output token throughput = sum of output tokens / duration (total adds the prompt tokens);
* goodput = requests meeting every given SLO (TTFT <= ttft, TPOT <= tpot, E2EL <= e2el) / duration;
* SLO attainment = requests meeting the SLO / requests sent (failed requests miss it).

Output tokens are the server's ``usage.completion_tokens`` when it reports usage, else our
tokenizer's count of the generated text, else the number of token chunks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from soarllm.bench.client import RequestResult
from soarllm.errors import InvalidRequestError

DEFAULT_PERCENTILES: tuple[float, ...] = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """Per-request latency objectives in milliseconds; None means no objective on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> SLO | None:
        """``"ttft=500,tpot=50"`` (milliseconds; ``e2el`` also allowed) -> SLO."""
        if not text:
            return None
        values: dict[str, float] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("ttft", "tpot", "e2el"):
                raise InvalidRequestError(
                    f"--slo expects ttft=MS,tpot=MS[,e2el=MS], got {text!r}"
                )
            try:
                values[f"{key}_ms"] = float(value)
            except ValueError:
                raise InvalidRequestError(f"--slo: {key} needs a number of ms, got {value!r}") from None
            if values[f"{key}_ms"] <= 0:
                raise InvalidRequestError(f"--slo: {key} must be positive")
        return cls(**values)

    def met_by(self, result: RequestResult) -> bool:
        if not result.success:
            return False
        checks = [
            (self.ttft_ms, result.ttft),
            (self.tpot_ms, result.tpot),
            (self.e2el_ms, result.latency),
        ]
        return all(limit is None or value * 1000.0 <= limit for limit, value in checks)

    def describe(self) -> str:
        parts = [
            f"{name} <= {v:g} ms"
            for name, v in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms), ("E2EL", self.e2el_ms))
            if v is not None
        ]
        return ", ".join(parts)


@dataclass
class Distribution:
    """Summary of one latency metric, in milliseconds."""

    count: int = 0
    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    percentiles: dict[str, float] = field(default_factory=dict)  # "p90" -> ms

    @classmethod
    def of(cls, seconds: list[float], percentiles: tuple[float, ...]) -> Distribution:
        if not seconds:
            return cls(percentiles={_pname(p): 0.0 for p in percentiles})
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        return cls(
            count=len(seconds),
            mean=float(ms.mean()),
            median=float(np.median(ms)),
            std=float(ms.std()),
            percentiles={_pname(p): float(np.percentile(ms, p)) for p in percentiles},
        )


def _pname(p: float) -> str:
    return f"p{p:g}"


@dataclass
class BenchmarkMetrics:
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # req/s
    output_throughput: float  # output tok/s
    total_token_throughput: float  # (input + output) tok/s
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2el_ms: Distribution
    mean_input_len: float
    mean_output_len: float
    peak_concurrency: int
    request_goodput: float | None = None  # req/s meeting the SLO
    slo_attainment: float | None = None  # fraction of requests meeting the SLO

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_concurrency(results: list[RequestResult]) -> int:
    """Most requests in flight at once, over half-open intervals [send, send + E2EL)."""
    events = []
    for r in results:
        if r.success:
            events.append((r.start_time, 1))
            events.append((r.start_time + r.latency, -1))
    events.sort()  # at equal times, -1 (a finish) sorts before +1 (a start)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def compute_metrics(
    results: list[RequestResult],
    duration_s: float,
    slo: SLO | None = None,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
) -> BenchmarkMetrics:
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [r.tpot for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(slo.met_by(r) for r in results) if slo else None
    return BenchmarkMetrics(
        num_requests=len(results),
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        ttft_ms=Distribution.of(ttfts, percentiles),
        tpot_ms=Distribution.of(tpots, percentiles),
        itl_ms=Distribution.of(itls, percentiles),
        e2el_ms=Distribution.of(e2els, percentiles),
        mean_input_len=total_in / len(ok) if ok else 0.0,
        mean_output_len=total_out / len(ok) if ok else 0.0,
        peak_concurrency=peak_concurrency(results),
        request_goodput=None if good is None else good / duration_s,
        slo_attainment=None if good is None else (good / len(results) if results else 0.0),
    )


@dataclass
class TokenCheck:
    """Server usage against our tokenizer's count of the same generated text."""

    requests_with_usage: int = 0
    requests_compared: int = 0
    mismatched: int = 0
    mean_abs_diff: float = 0.0
    max_abs_diff: int = 0


def check_token_counts(results: list[RequestResult]) -> TokenCheck:
    pairs = [
        (r.usage_output_tokens, r.local_output_tokens)
        for r in results
        if r.success and r.usage_output_tokens is not None and r.local_output_tokens is not None
    ]
    diffs = [abs(a - b) for a, b in pairs]
    return TokenCheck(
        requests_with_usage=sum(1 for r in results if r.usage_output_tokens is not None),
        requests_compared=len(pairs),
        mismatched=sum(1 for d in diffs if d),
        mean_abs_diff=float(np.mean(diffs)) if diffs else 0.0,
        max_abs_diff=max(diffs, default=0),
    )
