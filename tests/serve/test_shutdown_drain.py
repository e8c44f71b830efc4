"""Requests still running when the shutdown grace period runs out end with an answer: an OpenAI
stream gets an error event in OpenAI's shape and ``[DONE]`` (the official client raises it as an
APIError), a TGI stream gets TGI's error event, a non-streaming request a 503; the KV blocks are
all given back."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import uvicorn

from soarllm.engine.async_engine import AsyncLLMEngine
from soarllm.serve.app import build_app
from soarllm.serve.config import ServerConfig
from soarllm.serve.server import DrainingServer, end_requests_for_shutdown
from tests.serve.conftest import free_port
from tests.serve.fake_engine import FakeEngine

GUARD_S = 60  # hang guard only


def test_shutdown_ends_unfinished_requests_with_an_answer():
    fake = FakeEngine(step_time=0.005, max_model_len=100_000)
    engine = AsyncLLMEngine(fake)
    port = free_port()
    server = DrainingServer(
        uvicorn.Config(build_app(engine, ServerConfig(access_log=False)), host="127.0.0.1",
                       port=port, log_level="warning", lifespan="on",
                       timeout_graceful_shutdown=1.0),
        end_requests=end_requests_for_shutdown(engine),
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + GUARD_S
    while not server.started:
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.01)

    results: dict[str, object] = {}
    started = {k: threading.Event() for k in ("openai", "raw", "tgi", "plain")}

    def openai_stream():
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        chunks = 0
        try:
            for _ in client.completions.create(model="fake-model", prompt="go",
                                               max_tokens=50_000, stream=True):
                chunks += 1
                started["openai"].set()
            results["openai"] = ("completed", chunks)
        except openai.APIError as e:
            results["openai"] = (e, chunks)

    def raw_stream():
        body = {"prompt": "go", "max_tokens": 50_000, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=GUARD_S) as r:
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started["raw"].set()
        results["raw"] = lines

    def tgi_stream():
        body = {"inputs": "go", "parameters": {"max_new_tokens": 50_000}}
        with httpx.stream("POST", base + "/generate_stream", json=body, timeout=GUARD_S) as r:
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started["tgi"].set()
        results["tgi"] = lines

    def plain():
        started["plain"].set()
        results["plain"] = httpx.post(base + "/v1/completions",
                                      json={"prompt": "go", "max_tokens": 50_000},
                                      timeout=GUARD_S)

    clients = [threading.Thread(target=f) for f in (openai_stream, raw_stream, tgi_stream, plain)]
    for c in clients:
        c.start()
    for e in started.values():
        assert e.wait(GUARD_S)
    while len(fake.requests) < 4:  # all four are in the engine
        assert time.time() < deadline
        time.sleep(0.01)
    server.should_exit = True  # what SIGTERM does
    for c in clients:
        c.join(GUARD_S)
    thread.join(GUARD_S)

    error, chunks = results["openai"]
    assert isinstance(error, openai.APIError) and "shutting down" in error.message and chunks
    *tokens, last_event, done = results["raw"]
    assert tokens and done == "data: [DONE]"
    err = json.loads(last_event[6:])["error"]
    assert err["type"] == "service_unavailable_error" and err["code"] == 503
    assert "shutting down" in err["message"]
    *tokens, last_event = results["tgi"]
    assert tokens and set(json.loads(last_event[5:])) == {"error", "error_type"}
    plain_response = results["plain"]
    assert plain_response.status_code == 503
    assert plain_response.json()["error"]["type"] == "service_unavailable_error"
    assert not fake.requests and fake.free_blocks == fake.num_blocks
