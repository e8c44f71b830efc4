"""Per-API-key rate limits: requests per minute (--rate-limit-rpm) and tokens per minute
(--rate-limit-tpm), each a sliding-window log over the last 60 seconds.

A request is admitted when, counting it, the key has sent at most ``rpm`` requests and used at
most ``tpm`` tokens in the 60 seconds before now; otherwise it is refused with HTTP 429, a
``Retry-After`` of the seconds until enough of the window's oldest entries have aged out, and a
message naming the limit that was hit. Tokens are reserved at admission as
``prompt + n * max_tokens`` (max_tokens left out: the rest of the context) and corrected to
``prompt + tokens generated`` when the request ends, so an early stop gives the unused tokens back
for the rest of the window. A request that alone is larger than the token limit can never pass: it
is a 400 that says to lower max_tokens. A sliding log (not a token bucket) keeps the promise
literal — no 60-second window ever holds more than the limit — and has no burst allowance to
explain. The clock is injectable so that tests never sleep.

The limiter is used from the event loop only (admission and completion both happen there).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from soarllm.errors import InvalidRequestError, RateLimitError

WINDOW_S = 60.0


class RateLimitExceeded(RateLimitError):
    """A key went over one of its limits (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, *, limit: str, retry_after: int):
        super().__init__(message)
        self.limit = limit  # "requests" or "tokens"
        self.retry_after = retry_after


@dataclass
class _Entry:
    time: float
    cost: int
    expired: bool = False


@dataclass
class _Window:
    """The entries of one key and one limit from the last WINDOW_S seconds, and their sum."""

    entries: deque[_Entry] = field(default_factory=deque)
    total: int = 0

    def prune(self, now: float) -> None:
        # the same sum as wait_for's, so an entry leaves exactly when Retry-After says
        while self.entries and self.entries[0].time + WINDOW_S <= now:
            e = self.entries.popleft()
            e.expired = True
            self.total -= e.cost

    def add(self, now: float, cost: int) -> _Entry:
        e = _Entry(now, cost)
        self.entries.append(e)
        self.total += cost
        return e

    def wait_for(self, now: float, limit: int, cost: int) -> float:
        """Seconds until ``cost`` more fits under ``limit`` (0: it fits now)."""
        excess = self.total + cost - limit
        if excess <= 0:
            return 0.0
        for e in self.entries:
            excess -= e.cost
            if excess <= 0:
                return e.time + WINDOW_S - now
        return WINDOW_S  # cannot happen while cost <= limit

    def settle(self, entry: _Entry, cost: int) -> None:
        if not entry.expired:
            self.total += cost - entry.cost
        entry.cost = cost


class Grant:
    """What one admitted request holds in its key's windows: one request entry and one token
    entry per engine request (prompt), each corrected when that prompt's generation ends."""

    def __init__(self, limiter: RateLimiter, key: str, request: _Entry | None,
                 tokens: list[_Entry]):
        self._limiter = limiter
        self._key = key
        self._request = request
        self._tokens = tokens

    def settle(self, index: int, used_tokens: int) -> None:
        """Engine request ``index`` ended having used ``used_tokens`` (prompt + generated)."""
        if self._tokens:
            self._limiter._window(self._key, "tokens").settle(self._tokens[index], used_tokens)

    def refund(self) -> None:
        """The request never reached the engine: it counts against nothing."""
        if self._request is not None:
            self._limiter._window(self._key, "requests").settle(self._request, 0)
        for i in range(len(self._tokens)):
            self.settle(i, 0)


class RateLimiter:
    def __init__(self, rpm: int | None = None, tpm: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        for name, value in (("--rate-limit-rpm", rpm), ("--rate-limit-tpm", tpm)):
            if value is not None and value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value}")
        self.rpm = rpm
        self.tpm = tpm
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    @property
    def enabled(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def _window(self, key: str, limit: str) -> _Window:
        return self._windows.setdefault((key, limit), _Window())

    def admit(self, key: str, token_costs: list[int]) -> Grant:
        """Admit one request of ``key`` whose engine requests reserve ``token_costs`` tokens,
        or raise RateLimitExceeded (InvalidRequestError when it could never fit)."""
        now = self._clock()
        cost = sum(token_costs)
        if self.tpm is not None and cost > self.tpm:
            raise InvalidRequestError(
                f"this request reserves {cost} tokens (prompt + n x max_tokens) but the key's "
                f"limit is {self.tpm} tokens per minute; lower max_tokens (or n, or the prompt)",
                param="max_tokens",
            )
        checks = []
        if self.rpm is not None:
            checks.append(("requests", self.rpm, 1))
        if self.tpm is not None:
            checks.append(("tokens", self.tpm, cost))
        hit = []  # (seconds to wait, limit, its value, used in the window, this request's need)
        for limit, value, amount in checks:
            window = self._window(key, limit)
            window.prune(now)
            wait = window.wait_for(now, value, amount)
            if wait > 0:
                hit.append((wait, limit, value, window.total, amount))
        if hit:
            # Retry-After covers every limit that was hit: by then the request fits them all
            retry = max(1, math.ceil(max(h[0] for h in hit)))
            parts = [f"{limit} per minute: this key used {used} of its {value} {limit} in the "
                     f"last 60 s" + (f" and this request needs {amount}"
                                     if limit == "tokens" else "")
                     for _, limit, value, used, amount in hit]
            raise RateLimitExceeded(
                f"rate limit reached for {'; and for '.join(parts)}; retry in {retry} s",
                limit=max(hit)[1], retry_after=retry,
            )
        request = self._window(key, "requests").add(now, 1) if self.rpm is not None else None
        tokens = ([self._window(key, "tokens").add(now, c) for c in token_costs]
                  if self.tpm is not None else [])
        return Grant(self, key, request, tokens)

    def used(self, key: str) -> dict[str, int]:
        """Requests and tokens ``key`` has in its windows now (for the usage report)."""
        now = self._clock()
        out = {}
        for limit in ("requests", "tokens"):
            window = self._windows.get((key, limit))
            if window is not None:
                window.prune(now)
            out[limit] = window.total if window is not None else 0
        return out
