"""Step-time cost model: how long a step of T scheduled tokens takes, measured as the engine runs.

Each step's duration is folded into a running mean for its token count. ``time(T)`` interpolates
linearly between measured counts; beyond the largest measured count it extends the last measured
slope (never negative; with a single point, time grows in proportion to T). Below the smallest
measured count it assumes the smallest measured time: a step is never cheaper than that.

Where the model's kernels compute rows in blocks (``row_tile`` = (tile, limit): PyTorch's CPU int4
kernel takes 4 rows at a time and serves steps below DEQUANT_MIN_ROWS where soarllm's native
GEMM does not apply), a step of T < limit tokens costs what one
of T rounded up to the tile does: counts are measured and estimated at that size, so a
verification step that spills one token into a new block is priced as the whole block. One token
keeps its own count (a plain batch-1 decode: its own compiled graph, and the int4 kernel's
cheapest case). Measured on the default model at batch 1 (2-core AVX-512), PyTorch's kernel for
every count: 9.4 ms for 1 token, 11.5 / 12.9 / 14.6 for 2 / 3 / 4, 22.0 / 22.7 / 22.9 for 5 / 6 /
8, 27.5 for 9.

Step times are noisy upwards (another process, a page fault, a collection pause), and one bad
measurement must not price a count out for good: the planner would never choose it again, so it
would never be re-measured. Two guards, both from how a forward pass scales: a step never costs
more per token than a smaller measured step did (``time`` takes the smallest ``t(m) * T / m``
over measured counts m <= T), and a new measurement of a known count folds in at most
``max_jump`` times the current estimate.
"""

from __future__ import annotations

import bisect


class StepCostModel:
    def __init__(self, decay: float = 0.2, row_tile: tuple[int, int] = (1, 0),
                 max_jump: float = 3.0):
        self.decay = decay  # weight of a new measurement in the running mean
        self.max_jump = max_jump  # a known count's measurement counts as at most this x its mean
        self.tile, self.tile_limit = row_tile
        self._t: dict[int, float] = {}
        self._keys: list[int] = []
        self._cheapest: list[float] = []  # per key: the least seconds per token up to that key

    def padded(self, num_tokens: int) -> int:
        """The token count a step of ``num_tokens`` costs as (see row_tile)."""
        if self.tile > 1 and 1 < num_tokens < self.tile_limit:
            return min(-(-num_tokens // self.tile) * self.tile, self.tile_limit)
        return num_tokens

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or not seconds > 0:
            return
        num_tokens = self.padded(num_tokens)
        old = self._t.get(num_tokens)
        if old is None:
            self._t[num_tokens] = seconds
            bisect.insort(self._keys, num_tokens)
        else:
            seconds = min(seconds, self.max_jump * old)
            self._t[num_tokens] = old + self.decay * (seconds - old)
        best, self._cheapest = float("inf"), []
        for m in self._keys:
            best = min(best, self._t[m] / m)
            self._cheapest.append(best)

    def measured(self, num_tokens: int) -> bool:
        return self.padded(num_tokens) in self._t

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
        num_tokens = self.padded(num_tokens)
        # no dearer per token than a smaller measured step (an outlier cannot price a count out)
        i = bisect.bisect_right(keys, num_tokens)
        raw = self._raw_time(num_tokens)
        return min(raw, self._cheapest[i - 1] * num_tokens) if i else raw

    def _raw_time(self, num_tokens: int) -> float:
        keys = self._keys
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
