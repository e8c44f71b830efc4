"""Per-API-key usage: requests, prompt tokens and completion tokens since the server started.

The auth middleware names the caller's key for the duration of one HTTP request (``caller()``,
a context variable: request-scoped, not shared state); the serving layer charges that name as
requests are admitted and tokens are generated. Without keys every request is charged to
``anonymous``. Counted are requests that reached the engine (completions, chat, /infill, TGI):
their prompt tokens once each (as the responses' ``usage`` counts them) and every token the
engine generated for them, aborted requests included; refusals by the rate limiter are counted
apart, by limit. ``/metrics`` exports the same numbers labelled by key name, and
``GET /v1/usage`` reports them as JSON: a key sees its own line, an admin key
(--admin-api-key) every key's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Caller:
    name: str
    admin: bool = False


NO_AUTH = Caller(ANONYMOUS, admin=True)  # a server without keys: every caller sees all usage
_caller: ContextVar[Caller | None] = ContextVar("soar_api_caller", default=None)


def caller() -> Caller:
    """Who sent the HTTP request being handled (NO_AUTH on a server without keys)."""
    return _caller.get() or NO_AUTH


@contextmanager
def acting_as(who: Caller) -> Iterator[None]:
    token = _caller.set(who)
    try:
        yield
    finally:
        _caller.reset(token)


@dataclass
class KeyUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: dict[str, int] = field(
        default_factory=lambda: {"requests": 0, "tokens": 0})

    def report(self, name: str) -> dict:
        return {"key_name": name, **asdict(self),
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class UsageLedger:
    """Counters per key name, from the server's start (a restart starts them at zero)."""

    def __init__(self, names: Iterable[str] = ()):
        self._keys: dict[str, KeyUsage] = {n: KeyUsage() for n in names}

    def _of(self, name: str) -> KeyUsage:
        usage = self._keys.get(name)  # not setdefault: this runs per streamed chunk
        if usage is None:
            usage = self._keys[name] = KeyUsage()
        return usage

    def add_request(self, name: str, prompt_tokens: int) -> None:
        usage = self._of(name)
        usage.requests += 1
        usage.prompt_tokens += prompt_tokens

    def add_completion_tokens(self, name: str, num_tokens: int) -> None:
        self._of(name).completion_tokens += num_tokens

    def add_rate_limited(self, name: str, limit: str) -> None:
        self._of(name).rate_limited[limit] += 1

    def snapshot(self) -> dict[str, KeyUsage]:
        return {n: KeyUsage(u.requests, u.prompt_tokens, u.completion_tokens,
                            dict(u.rate_limited)) for n, u in self._keys.items()}


def usage_report(ledger: UsageLedger, who: Caller, limits: dict[str, int | None],
                 in_window: Callable[[str], dict[str, int]] | None = None) -> dict:
    """The JSON of GET /v1/usage: the caller's own line, or every key's for an admin.

    ``limits`` are the per-key limits (None: none); ``in_window(name)`` gives what a key has
    used in the current rate-limit window, when the server limits rates."""
    snapshot = ledger.snapshot()
    names = list(snapshot) if who.admin else [who.name]
    data = []
    for name in names:
        line = snapshot.get(name, KeyUsage()).report(name)
        if in_window is not None:
            line["last_minute"] = in_window(name)
        data.append(line)
    return {"object": "list", "data": data,
            "limits": {"requests_per_minute": limits.get("rpm"),
                       "tokens_per_minute": limits.get("tpm")}}
