"""Per-key rate limits (requests and tokens per minute, sliding 60 s window).

The limiter is driven by a fake clock: no test sleeps or times anything. Its decisions are checked
against a brute-force reading of the promise ("at most N in any 60 s, counting this request"),
its Retry-After against what the same limiter then does at that time, and the server's answers
through the official ``openai`` client (RateLimitError, Retry-After, OpenAI's error shape).
"""

from __future__ import annotations

import math
import random

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from soarllm.errors import InvalidRequestError
from soarllm.serve.rate_limit import WINDOW_S, RateLimiter, RateLimitExceeded
from tests.serve.conftest import start_soar_serve


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- the limiter on a fake clock ----------------------------------------------------------------


def test_requests_per_minute_and_retry_after():
    clock = FakeClock(0.0)
    limiter = RateLimiter(rpm=3, clock=clock)
    for t in (0.0, 10.0, 20.0):
        clock.t = t
        limiter.admit("a", [5])
    clock.t = 30.0
    with pytest.raises(RateLimitExceeded) as e:
        limiter.admit("a", [5])
    # the oldest request (t=0) leaves the window at t=60: 30 s from now
    assert e.value.limit == "requests" and e.value.retry_after == 30
    assert e.value.status_code == 429 and "requests per minute" in e.value.message
    limiter.admit("b", [5])  # another key has its own window
    clock.t = 59.5
    with pytest.raises(RateLimitExceeded) as e:
        limiter.admit("a", [5])
    assert e.value.retry_after == 1  # 0.5 s, rounded up
    clock.t = 60.0
    limiter.admit("a", [5])


def test_tokens_reserved_then_corrected_on_finish():
    clock = FakeClock()
    limiter = RateLimiter(tpm=100, clock=clock)
    first = limiter.admit("a", [60])  # prompt + max_tokens reserved
    clock.t += 1
    with pytest.raises(RateLimitExceeded) as e:
        limiter.admit("a", [50])
    assert e.value.limit == "tokens" and e.value.retry_after == 59
    assert "tokens per minute" in e.value.message
    first.settle(0, 30)  # it stopped early: 30 tokens used, 30 given back
    limiter.admit("a", [50])
    assert limiter.used("a")["tokens"] == 80
    with pytest.raises(InvalidRequestError, match="lower max_tokens"):
        limiter.admit("a", [101])  # can never fit: 400, not 429


def test_refunded_requests_count_against_nothing():
    clock = FakeClock()
    limiter = RateLimiter(rpm=1, tpm=10, clock=clock)
    limiter.admit("a", [4, 6]).refund()
    assert limiter.used("a") == {"requests": 0, "tokens": 0}
    limiter.admit("a", [4, 6])
    with pytest.raises(RateLimitExceeded):
        limiter.admit("a", [1])


def test_settling_after_the_window_moved_on_changes_nothing():
    clock = FakeClock()
    limiter = RateLimiter(tpm=100, clock=clock)
    old = limiter.admit("a", [90])
    clock.t += WINDOW_S + 1
    limiter.admit("a", [70])
    old.settle(0, 10)  # a request that outlived the window ends
    assert limiter.used("a")["tokens"] == 70


@pytest.mark.parametrize("seed", range(4))
def test_decisions_match_the_sliding_window_definition(seed):
    """Random arrivals, costs and early finishes; the limiter against a brute-force reading of
    'admitted iff, counting it, the last 60 s hold at most rpm requests and tpm tokens', and its
    Retry-After against the first moment that reading admits the same request."""
    rng = random.Random(seed)
    rpm, tpm = rng.randint(2, 8), rng.randint(50, 200)
    clock = FakeClock(0.0)
    limiter = RateLimiter(rpm=rpm, tpm=tpm, clock=clock)
    admitted: list[list[float]] = []  # [time, tokens] of admitted requests, as the oracle sees it

    def fits(at: float, cost: int) -> bool:
        window = [e for e in admitted if e[0] + WINDOW_S > at]
        return len(window) + 1 <= rpm and sum(e[1] for e in window) + cost <= tpm

    grants = []
    refusals = 0
    t = 0.0
    for _ in range(400):
        t += rng.expovariate(1 / 6.0)
        clock.t = t
        if grants and rng.random() < 0.4:  # some request ends, having used fewer tokens
            grant, entry = grants.pop(rng.randrange(len(grants)))
            entry[1] = rng.randint(0, int(entry[1]))
            grant.settle(0, entry[1])
        cost = rng.randint(1, tpm)
        try:
            grant = limiter.admit("k", [cost])
        except RateLimitExceeded as e:
            refusals += 1
            assert not fits(t, cost), f"refused at t={t:.2f} but the window has room"
            first = min(s for s in [e_[0] + WINDOW_S for e_ in admitted] if s > t
                        and fits(s, cost))
            assert e.retry_after == max(1, math.ceil(first - t))
        else:
            assert fits(t, cost), f"admitted at t={t:.2f} over the limit"
            entry = [t, cost]
            admitted.append(entry)
            grants.append((grant, entry))
    assert 0 < refusals < 400  # the run exercised both answers


# -- a real server ------------------------------------------------------------------------------

KEYS = {"rpm-user": "secret-rpm-1234", "tpm-user": "secret-tpm-5678"}
RPM, TPM = 4, 120


@pytest.fixture(scope="module")
def limited_server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rate-limit")
    keys_file = tmp / "keys.txt"
    keys_file.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
    srv = start_soar_serve(
        str(tiny_model_dir), "--served-model-name", "tiny", "--no-access-log",
        "--api-keys-file", str(keys_file), "--rate-limit-rpm", str(RPM),
        "--rate-limit-tpm", str(TPM), log_path=tmp / "server.log")
    yield srv
    srv.stop()


def _client(srv, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEYS[name], max_retries=0)


def test_over_the_request_limit_the_client_gets_429_with_retry_after(limited_server):
    client = _client(limited_server, "rpm-user")
    for _ in range(RPM):
        client.completions.create(model="tiny", prompt="def f(x):", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="def f(x):", max_tokens=1)
    retry_after = int(e.value.response.headers["retry-after"])
    assert 1 <= retry_after <= WINDOW_S
    error = e.value.response.json()["error"]
    assert error["type"] == "rate_limit_error" and "requests per minute" in error["message"]
    # streams are refused before they start, with the same status
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="tiny", stream=True, max_tokens=1,
                                       messages=[{"role": "user", "content": "hi"}])
    # TGI's routes share the key's budget, in TGI's error shape
    r = httpx.post(limited_server.base_url + "/generate",
                   headers={"Authorization": f"Bearer {KEYS['rpm-user']}"},
                   json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 429 and "retry-after" in r.headers
    assert r.json()["error_type"] == "overloaded"
    # the other key is not affected
    _client(limited_server, "tpm-user").completions.create(model="tiny", prompt="x", max_tokens=1)

    headers = {"Authorization": f"Bearer {KEYS['rpm-user']}"}
    usage = httpx.get(limited_server.base_url + "/v1/usage", headers=headers).json()
    (line,) = usage["data"]
    assert line["key_name"] == "rpm-user" and line["requests"] == RPM
    assert line["rate_limited"] == {"requests": 3, "tokens": 0}  # completion, chat, TGI
    assert usage["limits"] == {"requests_per_minute": RPM, "tokens_per_minute": TPM}
    metrics = httpx.get(limited_server.base_url + "/metrics", headers=headers).text
    limited = {tuple(sorted(s.labels.items())): s.value
               for f in text_string_to_metric_families(metrics)
               for s in f.samples if s.name == "soar:api_key_rate_limited_total"}
    assert limited[(("key_name", "rpm-user"), ("limit", "requests"))] == 3


def test_over_the_token_limit(limited_server):
    client = _client(limited_server, "tpm-user")
    prompt = "import os"
    n_prompt = client.completions.create(model="tiny", prompt=prompt,
                                         max_tokens=1).usage.prompt_tokens
    used = httpx.get(limited_server.base_url + "/v1/usage",
                     headers={"Authorization": f"Bearer {KEYS['tpm-user']}"}).json()
    (line,) = used["data"]
    room = TPM - line["last_minute"]["tokens"]  # what this key's finished requests left
    # a request that reserves more than the room left: 429 naming the token limit
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt=prompt,
                                  max_tokens=room - n_prompt + 1)
    assert "tokens per minute" in e.value.response.json()["error"]["message"]
    # one that fits exactly is admitted
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=room - n_prompt,
                                  extra_body={"ignore_eos": True})
    assert r.usage.total_tokens == room
    # one that could never fit is the client's mistake: 400 saying what to change
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=TPM)
