"""When each request is sent: all at once, or a renewal process at a given request rate.

Inter-arrival gaps are drawn from a gamma distribution with shape ``burstiness`` and mean
``1 / rate``. ``burstiness == 1`` is a Poisson process (exponential gaps); below 1 the arrivals
are burstier, above 1 more regular; ``inf`` sends at a fixed interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LoadPoint:
    """One point of load: a request rate (inf = all at once) and/or a concurrency cap."""

    request_rate: float = math.inf
    max_concurrency: int | None = None
    burstiness: float = 1.0

    def label(self) -> str:
        parts = []
        if self.max_concurrency is not None:
            parts.append(f"c={self.max_concurrency}")
        if math.isfinite(self.request_rate):
            parts.append(f"rate={self.request_rate:g}/s")
            if self.burstiness != 1.0:
                parts.append(f"gamma k={self.burstiness:g}")
        return " ".join(parts) or "rate=inf"


def arrival_offsets(
    num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Send times in seconds after the start, one per request; the first request leaves at 0."""
    if num_requests <= 0:
        return []
    if request_rate <= 0:
        raise ValueError(f"request rate must be positive, got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    if math.isinf(burstiness):
        gaps = np.full(num_requests - 1, 1.0 / request_rate)
    else:
        rng = np.random.default_rng(seed)
        scale = 1.0 / (request_rate * burstiness)  # mean gap = shape * scale = 1 / rate
        gaps = rng.gamma(shape=burstiness, scale=scale, size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
