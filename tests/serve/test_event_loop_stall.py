"""The event loop never waits for the tokenizer: while a prompt is being tokenized (held in the
tokenizer by a gate the test controls) or a 10 MB prompt is being received and refused, /health
answers and a running stream keeps receiving tokens. Only the order of events is asserted."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx

from soarllm.serve.config import ServerConfig
from tests.serve.conftest import start_thread_server
from tests.serve.fake_engine import FakeEngine

MARKER = "HOLD-THE-TOKENIZER"
GUARD_S = 60  # hang guards only: the assertions are about order, not time


class GatedTokenizer:
    """Delegates to a tokenizer; encoding a text with MARKER blocks until ``release`` is set.
    Records the length of every text it is asked to encode."""

    def __init__(self, inner):
        self._inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lengths: list[int] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def __call__(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        if MARKER in text:
            self.entered.set()
            assert self.release.wait(GUARD_S), "the test never released the tokenizer"
        return self._inner(text, *args, **kwargs)


async def _stream_tokens(http: httpx.AsyncClient, counter: list[int], started: asyncio.Event):
    body = {"prompt": "x", "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                counter[0] += len(json.loads(line[6:])["choices"][0]["text"])
                started.set()


async def _more_tokens(counter: list[int], than: int, n: int = 5) -> None:
    while counter[0] < than + n:
        await asyncio.sleep(0.001)


def _server(fake: FakeEngine):
    return start_thread_server(fake, ServerConfig(access_log=False, max_body_bytes=32 * 2**20))


def test_tokenizing_a_prompt_does_not_stall_health_or_streams():
    fake = FakeEngine(step_time=0.002, max_model_len=8192)
    gate = fake.tokenizer = GatedTokenizer(fake.tokenizer)
    srv = _server(fake)
    events: list[str] = []

    async def main():
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=GUARD_S) as http:
            counter, started = [0], asyncio.Event()
            stream = asyncio.create_task(_stream_tokens(http, counter, started))
            await asyncio.wait_for(started.wait(), GUARD_S)

            async def held_request() -> httpx.Response:
                r = await http.post("/v1/completions",
                                    json={"prompt": f"{MARKER} go", "max_tokens": 3})
                events.append("held request answered")
                return r

            held = asyncio.create_task(held_request())
            await asyncio.wait_for(asyncio.to_thread(gate.entered.wait), GUARD_S)
            events.append("tokenizer entered")
            for _ in range(5):
                r = await http.get("/health")
                events.append(f"health {r.status_code}")
            await asyncio.wait_for(_more_tokens(counter, counter[0]), GUARD_S)
            events.append("stream advanced")
            assert not held.done()
            events.append("tokenizer released")
            gate.release.set()
            response = await asyncio.wait_for(held, GUARD_S)
            stream.cancel()
            return response

    try:
        response = asyncio.run(main())
    finally:
        gate.release.set()
        srv.stop()
    assert response.status_code == 200, response.text
    assert events == ["tokenizer entered", *["health 200"] * 5, "stream advanced",
                      "tokenizer released", "held request answered"]


def test_a_10mb_prompt_is_refused_without_stalling_health_or_streams():
    """The 10 MB body is sent in pieces; between two pieces /health must answer and the stream
    must receive tokens. The server then refuses the prompt by its length, without tokenizing
    it, while the stream goes on."""
    fake = FakeEngine(step_time=0.002, max_model_len=8192)
    gate = fake.tokenizer = GatedTokenizer(fake.tokenizer)
    srv = _server(fake)
    events: list[str] = []
    prompt = "a " * 5_000_000
    body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    pieces = [body[i : i + 2**20] for i in range(0, len(body), 2**20)]

    async def main():
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=GUARD_S) as http, \
                httpx.AsyncClient(base_url=srv.base_url, timeout=GUARD_S) as probe:
            counter, started = [0], asyncio.Event()
            stream = asyncio.create_task(_stream_tokens(http, counter, started))
            await asyncio.wait_for(started.wait(), GUARD_S)

            async def upload():
                for i, piece in enumerate(pieces):
                    yield piece
                    if i == len(pieces) // 2:  # the server is receiving the 10 MB prompt
                        r = await probe.get("/health")
                        events.append(f"health {r.status_code} mid-upload")
                        await asyncio.wait_for(_more_tokens(counter, counter[0]), GUARD_S)
                        events.append("stream advanced mid-upload")
                events.append("upload done")

            r = await http.post("/v1/completions", content=upload(),
                                headers={"content-type": "application/json"})
            events.append(f"big prompt answered {r.status_code}")
            await asyncio.wait_for(_more_tokens(counter, counter[0]), GUARD_S)
            events.append("stream advanced after")
            health = await probe.get("/health")
            events.append(f"health {health.status_code} after")
            stream.cancel()
            return r

    try:
        r = asyncio.run(main())
    finally:
        srv.stop()
    assert events == ["health 200 mid-upload", "stream advanced mid-upload", "upload done",
                      "big prompt answered 400", "stream advanced after", "health 200 after"]
    err = r.json()["error"]
    assert "maximum context length is 8192 tokens" in err["message"], err
    assert str(len(prompt)) in err["message"]
    assert max(gate.lengths) < 100  # the 10 MB prompt never reached the tokenizer
