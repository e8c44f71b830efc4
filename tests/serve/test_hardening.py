"""Hostile input and operations, as regression tests for issue #8: every body JSON can carry gets
a 2xx or an OpenAI-shaped 4xx on a connection that stays usable; absurd prompts are refused before
tokenizing; admission counts only what really waits; failed requests end their streams with an
error event; the API key guards everything but /health; CORS; --default-max-tokens; GET /.

The fake engine (tests/serve/fake_engine.py) stands in for the model; the official ``openai``
client is the judge of what an OpenAI error event is."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest

from soarllm.serve.config import ServerConfig
from soarllm.serve.json_body import MAX_DEPTH
from tests.serve.conftest import API_KEY, start_thread_server
from tests.serve.fake_engine import FakeEngine

COMP = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server():
    srv = start_thread_server(FakeEngine(step_time=0.001, max_model_len=512),
                              ServerConfig(served_model_names=["fake"], access_log=False))
    yield srv
    srv.stop()


def _openai_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    for w in words:
        assert w in err["message"], err["message"]
    return err


# -- bodies JSON can carry ----------------------------------------------------------------------

LONE = b'"hi \\ud800 there"'
BAD_BODIES = [
    ("/v1/completions", b'{"prompt": ' + LONE + b', "max_tokens": 2}', ["surrogate", "prompt"]),
    ("/v1/completions", b'{"prompt": ["ok", ' + LONE + b'], "max_tokens": 2}', ["prompt[1]"]),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": ' + LONE + b'}]}', ["messages[0].content"]),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "\\udc00": 1}',
     ["surrogate"]),
    ("/tokenize", b'{"prompt": ' + LONE + b'}', ["surrogate"]),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1e400}', ["too large"]),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', ["NaN"]),
    ("/v1/completions", b'{"prompt": "hi", "temperature": -Infinity}', ["-Infinity"]),
    ("/v1/completions", b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", ["digits"]),
    ("/v1/completions", b'{"prompt": "h\xe9llo"}', ["UTF-8"]),
    ("/v1/completions", b'{"prompt": ' + b"[" * (MAX_DEPTH + 5) + b"]" * (MAX_DEPTH + 5) + b"}",
     ["nested"]),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, ["nested"]),
]


@pytest.mark.parametrize("path, body, words", BAD_BODIES)
def test_unacceptable_json_is_a_400_and_the_connection_stays_usable(server, path, body, words):
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        r = http.post(path, content=body, headers=JSON)
        _openai_error(r, 400, *words)
        assert r.headers.get("connection") != "close"
        # the same keep-alive connection answers the next request
        ok = http.post("/v1/completions", json=COMP)
        assert ok.status_code == 200, ok.text


def test_tgi_routes_answer_bad_json_in_tgi_shape(server):
    r = httpx.post(server.base_url + "/generate", content=b'{"inputs": ' + LONE + b"}",
                   headers=JSON)
    assert r.status_code == 422 and "surrogate" in r.json()["error"]
    assert r.json()["error_type"] == "validation"


@pytest.mark.parametrize("prompt", ["nul \x00 inside", "\x00", "emoji \U0001F600 and 中文",
                                    "paired \ud83d\ude00 surrogates"])
def test_text_json_can_carry_is_served(server, prompt):
    # the last one arrives as the escape pair \ud83d\ude00: one valid character
    body = json.dumps({**COMP, "prompt": prompt}).encode()
    r = httpx.post(server.base_url + "/v1/completions", content=body, headers=JSON)
    assert r.status_code == 200, r.text
    r = httpx.post(server.base_url + "/tokenize", content=json.dumps({"prompt": prompt}),
                   headers=JSON)
    assert r.status_code == 200 and r.json()["count"] >= 1


def test_utf16_body_is_understood(server):
    r = httpx.post(server.base_url + "/v1/completions",
                   content=json.dumps(COMP).encode("utf-16"), headers=JSON)
    assert r.status_code == 200, r.text


# -- absurd prompts -----------------------------------------------------------------------------


class TokenizerSpy:
    """Delegates to a tokenizer and records the length of every text it encodes."""

    def __init__(self, inner):
        self._inner = inner
        self.lengths: list[int] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def __call__(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        return self._inner(text, *args, **kwargs)


def test_absurd_prompts_are_refused_before_tokenizing():
    fake = FakeEngine(step_time=0.001, max_model_len=512)
    spy = fake.tokenizer = TokenizerSpy(fake.tokenizer)
    srv = start_thread_server(fake, ServerConfig(access_log=False))
    try:
        limit = srv.engine.max_model_len * max(len(t) for t in spy.get_vocab())
        big = "a " * 3_000_000
        cases = [
            ("/v1/completions", {"prompt": big, "max_tokens": 1}),
            ("/v1/completions", {"prompt": ["ok", big], "max_tokens": 1}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}),
            ("/tokenize", {"prompt": big}),
        ]
        for path, body in cases:
            r = httpx.post(srv.base_url + path, json=body, timeout=60)
            err = _openai_error(r, 400, "maximum context length is 512 tokens", str(limit))
            assert err["type"] == "invalid_request_error"
        r = httpx.post(srv.base_url + "/generate", json={"inputs": big}, timeout=60)
        assert r.status_code == 422 and str(limit) in r.json()["error"]
        # token ids: refused by count, before decoding them for the echo
        r = httpx.post(srv.base_url + "/v1/completions",
                       json={"prompt": [65] * 600, "max_tokens": 1})
        _openai_error(r, 400, "600 tokens")
        assert max(spy.lengths, default=0) <= limit  # never tokenized
        ok = httpx.post(srv.base_url + "/v1/completions", json=COMP)
        assert ok.status_code == 200 and spy.lengths[-1] == 2
    finally:
        srv.stop()


# -- admission ----------------------------------------------------------------------------------


def test_a_burst_that_fits_max_num_seqs_plus_max_waiting_is_accepted():
    seqs, waiting = 32, 8
    srv = start_thread_server(FakeEngine(step_time=0.005, max_num_seqs=seqs),
                              ServerConfig(max_waiting=waiting, access_log=False))

    async def burst(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120, limits=limits) as h:
            body = {"prompt": "x", "max_tokens": 40, "temperature": 0}
            return await asyncio.gather(*(h.post("/v1/completions", json=body)
                                          for _ in range(n)))

    try:
        fits = asyncio.run(burst(seqs + waiting))
        assert [r.status_code for r in fits] == [200] * (seqs + waiting)
        more = asyncio.run(burst(seqs + waiting + 40))
    finally:
        srv.stop()
    statuses = [r.status_code for r in more]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= seqs + waiting, statuses
    for r in more:
        if r.status_code == 503:
            assert r.headers["retry-after"] and r.json()["error"]["type"] == "overloaded_error"
    assert srv.fake.free_blocks == srv.fake.num_blocks


# -- requests the engine fails ------------------------------------------------------------------


class OneFailsEngine(FakeEngine):
    """Fails (alone) every request whose prompt contains POISON, as LLMEngine's containment
    does: the others in the step go on. ``broken`` reports consecutive all-failed steps."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.failures: dict[str, Exception] = {}
        self.num_consecutive_failed_steps = 0

    def step(self):
        from soarllm.engine.failures import RequestFailedError

        for rid, req in list(self.requests.items()):
            if "POISON" in self.tokenizer.decode(req.prompt_ids) and req.started:
                self.abort_request(rid)
                self.failures[rid] = RequestFailedError(f"injected failure of {rid}")
        return super().step()

    def take_failures(self):
        failures, self.failures = self.failures, {}
        return failures


def test_a_request_failed_by_the_engine_ends_alone_with_an_error_event():
    fake = OneFailsEngine(step_time=0.002)
    srv = start_thread_server(fake, ServerConfig(access_log=False))
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
    results: dict[str, object] = {}

    def run(name: str, prompt: str) -> None:
        try:
            stream = client.completions.create(model="fake-model", prompt=prompt, max_tokens=30,
                                               temperature=0, stream=True)
            results[name] = "".join(c.choices[0].text for c in stream if c.choices)
        except openai.APIError as e:
            results[name] = e

    try:
        threads = [threading.Thread(target=run, args=(n, p)) for n, p in
                   (("good", "fine"), ("bad", "POISON here"), ("also good", "ok"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        raw = httpx.post(srv.base_url + "/v1/completions",
                         json={"prompt": "POISON", "max_tokens": 5})
        tgi = httpx.post(srv.base_url + "/generate_stream",
                         json={"inputs": "POISON", "parameters": {"max_new_tokens": 5}})
        health = httpx.get(srv.base_url + "/health").status_code
    finally:
        srv.stop()
    expected = "".join(f" w{i}" for i in range(20))[:30]
    assert results["good"] == results["also good"] == expected
    assert isinstance(results["bad"], openai.APIError)
    assert "injected failure" in results["bad"].message
    _openai_error(raw, 500, "injected failure")
    events = [json.loads(line[5:]) for line in tgi.text.splitlines() if line.startswith("data:")]
    assert events[-1]["error_type"] == "generation" and "injected" in events[-1]["error"]
    assert health == 200


def test_persistent_step_failures_turn_health_unhealthy():
    fake = OneFailsEngine(step_time=0.001)
    srv = start_thread_server(fake, ServerConfig(access_log=False))
    try:
        assert httpx.get(srv.base_url + "/health").status_code == 200
        fake.num_consecutive_failed_steps = 3  # what LLMEngine reports after 3 all-failed steps
        health = httpx.get(srv.base_url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        refused = httpx.post(srv.base_url + "/v1/completions", json=COMP)
        _openai_error(refused, 503, "not running")
    finally:
        srv.stop()


# -- auth, CORS, defaults, GET / ------------------------------------------------------------------


@pytest.mark.parametrize("public_metrics", [False, True])
def test_api_key_guards_everything_but_health(public_metrics):
    srv = start_thread_server(FakeEngine(), ServerConfig(api_key=API_KEY, access_log=False,
                                                         public_metrics=public_metrics))
    key = {"Authorization": f"Bearer {API_KEY}"}
    try:
        get = lambda path, **kw: httpx.get(srv.base_url + path, **kw)  # noqa: E731
        assert get("/health").status_code == 200
        for path in ("/docs", "/openapi.json", "/redoc", "/version", "/v1/models", "/info",
                     "/v1/usage"):
            r = get(path)
            assert r.status_code == 401, path
            assert get(path, headers=key).status_code == 200, path
        # the playground page opens without a key (it holds no data); TGI's POST / does not
        assert get("/").status_code == 200
        assert httpx.post(srv.base_url + "/", json={"inputs": "a"}).status_code == 401
        assert get("/metrics").status_code == (200 if public_metrics else 401)
        assert get("/metrics", headers=key).status_code == 200
    finally:
        srv.stop()


def test_get_root_is_the_playground_page(server):
    r = httpx.get(server.base_url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'data-role="prompt"' in r.text and "{{nonce}}" not in r.text
    assert "script-src 'nonce-" in r.headers["content-security-policy"]


def test_cors_for_allowed_origins_only():
    origin = "http://playground.example"
    srv = start_thread_server(FakeEngine(), ServerConfig(api_key=API_KEY, access_log=False,
                                                         allowed_origins=[origin]))
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    try:
        url = srv.base_url + "/v1/chat/completions"
        r = httpx.options(url, headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        # a refused request still carries the header, so the browser shows the 401
        r = httpx.post(url, json=CHAT, headers={"Origin": origin})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == origin
        r = httpx.post(url, json=CHAT, headers={"Origin": origin,
                                                "Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        other = httpx.options(url, headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        srv.stop()
    srv = start_thread_server(FakeEngine(), ServerConfig(access_log=False))
    try:
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=CHAT,
                       headers={"Origin": origin})
        assert "access-control-allow-origin" not in r.headers
    finally:
        srv.stop()


@pytest.mark.parametrize("default", [None, 7, 10_000])
def test_default_max_tokens_applies_to_chat_without_max_tokens(default):
    # the fake model never emits EOS, so a request runs to its token limit
    srv = start_thread_server(FakeEngine(step_time=0.0, max_model_len=128),
                              ServerConfig(access_log=False, default_max_tokens=default))
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
        r = httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=60)
        usage = r.json()["usage"]
        room = 128 - usage["prompt_tokens"]
        assert usage["completion_tokens"] == (room if default is None else min(default, room))
        explicit = httpx.post(srv.base_url + "/v1/chat/completions",
                              json={**body, "max_tokens": 3}).json()["usage"]
        assert explicit["completion_tokens"] == 3
        completion = httpx.post(srv.base_url + "/v1/completions",
                                json={"prompt": "hi"}).json()["usage"]
        assert completion["completion_tokens"] == 16  # OpenAI's default for completions
    finally:
        srv.stop()
