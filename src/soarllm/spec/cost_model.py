"""Step-time cost model: how long a step of T scheduled tokens takes, measured as the engine runs.

Each step's duration is folded into a running mean for its token count. ``time(T)`` interpolates
linearly between measured counts; beyond the largest measured count it extends the last measured
slope (never negative; with a single point, time grows in proportion to T). Below the smallest
measured count it assumes the smallest measured time: a step is never cheaper than that.
"""

from __future__ import annotations

import bisect


class StepCostModel:
    def __init__(self, decay: float = 0.2):
        self.decay = decay  # weight of a new measurement in the running mean
        self._t: dict[int, float] = {}
        self._keys: list[int] = []

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or not seconds > 0:
            return
        old = self._t.get(num_tokens)
        if old is None:
            self._t[num_tokens] = seconds
            bisect.insort(self._keys, num_tokens)
        else:
            self._t[num_tokens] = old + self.decay * (seconds - old)

    def measured(self, num_tokens: int) -> bool:
        return num_tokens in self._t

    @property
    def max_tokens(self) -> int:
        """The largest measured token count (0: none)."""
        return self._keys[-1] if self._keys else 0

    @property
    def num_points(self) -> int:
        return len(self._keys)

    def time(self, num_tokens: int) -> float | None:
        """Estimated seconds for a step of ``num_tokens`` tokens (None before any measurement)."""
        keys = self._keys
        if not keys:
            return None
        if num_tokens in self._t:
            return self._t[num_tokens]
        i = bisect.bisect_left(keys, num_tokens)
        if i == 0:
            return self._t[keys[0]]
        if i == len(keys):
            hi = keys[-1]
            if len(keys) == 1:
                return self._t[hi] * num_tokens / hi
            lo = keys[-2]
            slope = max((self._t[hi] - self._t[lo]) / (hi - lo), 0.0)
            return self._t[hi] + slope * (num_tokens - hi)
        lo, hi = keys[i - 1], keys[i]
        w = (num_tokens - lo) / (hi - lo)
        return self._t[lo] * (1 - w) + self._t[hi] * w
