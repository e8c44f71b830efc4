"""/health, /metrics, /tokenize, /detokenize, --max-waiting, access logs."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from fastapi.testclient import TestClient

from soarllm.engine.async_engine import AsyncLLMEngine
from soarllm.serve.access_log import ACCESS_LOGGER
from soarllm.serve.app import build_app
from soarllm.serve.config import ServerConfig
from tests.serve.conftest import start_thread_server
from tests.serve.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def client():
    app = build_app(AsyncLLMEngine(FakeEngine()), ServerConfig(served_model_names=["m"]))
    with TestClient(app) as c:
        yield c


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_metrics_names_and_values(client):
    client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5, "temperature": 0})
    client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 30, "stop": "w1",
                                         "temperature": 0})
    client.post("/v1/completions", json={"prompt": "", "max_tokens": 5})
    text = client.get("/metrics").text
    for name in ("soar:request_success_total", "soar:time_to_first_token_seconds_bucket",
                 "soar:time_per_output_token_seconds_bucket",
                 "soar:e2e_request_latency_seconds_bucket", "soar:prompt_tokens_total",
                 "soar:generation_tokens_total", "soar:num_requests_running",
                 "soar:num_requests_waiting", "soar:kv_cache_usage_perc",
                 "soar:prefix_cache_queries_total", "soar:prefix_cache_hits_total",
                 "soar:prefix_cache_hit_rate", "soar:http_requests_total"):
        assert name in text, name
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['soar:request_success_total{finished_reason="length",model_name="m"}'] == 1
    assert samples['soar:request_success_total{finished_reason="stop",model_name="m"}'] == 1
    assert samples['soar:generation_tokens_total{model_name="m"}'] == 5 + 6
    assert samples['soar:prompt_tokens_total{model_name="m"}'] == 10
    assert samples['soar:http_requests_total{method="POST",path="/v1/completions",status="400"}'] \
        == 1


def test_tokenize_and_detokenize(client):
    r = client.post("/tokenize", json={"prompt": "héllo"})
    assert r.status_code == 200
    out = r.json()
    assert out["count"] == len(out["tokens"]) == 6 and out["max_model_len"] == 512
    assert client.post("/detokenize", json={"tokens": out["tokens"]}).json() == {
        "prompt": "héllo"}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 200 and chat.json()["count"] > 1
    assert client.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert client.post("/tokenize", json={}).status_code == 400
    assert client.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404


def test_access_log_is_json_with_request_id(client, caplog):
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        r = client.get("/v1/models", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    records = [json.loads(rec.getMessage()) for rec in caplog.records
               if rec.name == ACCESS_LOGGER]
    assert records and records[-1]["request_id"] == "abc-123"
    assert records[-1]["path"] == "/v1/models" and records[-1]["status"] == 200
    assert records[-1]["duration_ms"] >= 0


def test_max_waiting_answers_503_with_retry_after():
    fake = FakeEngine(step_time=0.001, max_num_seqs=1)
    srv = start_thread_server(fake, ServerConfig(max_waiting=2, retry_after_s=3, access_log=False))
    fake.gate.clear()  # the engine holds its first step until every refusal has come back

    async def main():
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as http:
            body = {"prompt": "x", "max_tokens": 20, "temperature": 0}
            tasks = [asyncio.create_task(http.post("/v1/completions", json=body))
                     for _ in range(12)]
            # 1 running + 2 waiting fit; the other 9 are refused while the engine is held
            for _ in range(6000):  # a broken admission would accept them all: fail, don't hang
                if sum(t.done() for t in tasks) >= 9:
                    break
                await asyncio.sleep(0.01)
            fake.gate.set()
            return await asyncio.gather(*tasks)

    try:
        responses = asyncio.run(main())
    finally:
        fake.gate.set()
        srv.stop()
    statuses = [r.status_code for r in responses]
    assert sorted(statuses) == [200] * 3 + [503] * 9, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "3"
    assert rejected.json()["error"]["type"] == "overloaded_error"
    assert srv.fake.free_blocks == srv.fake.num_blocks


def test_an_engine_failure_ends_the_requests_in_it_and_the_server_goes_on(client):
    r = client.post("/v1/completions", json={"prompt": "FAIL_STEP", "max_tokens": 5})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "FAIL_STEP"}], "max_tokens": 5,
            "stream": True}) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
    ok = client.post("/v1/completions", json={"prompt": "fine", "max_tokens": 5})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
    assert client.get("/health").status_code == 200
