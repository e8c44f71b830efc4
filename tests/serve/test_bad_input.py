"""Bad input: every client mistake is a 4xx with an OpenAI-style body that names what to change,
never a 500, and the server keeps serving."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from soarllm.engine.async_engine import AsyncLLMEngine
from soarllm.serve.app import build_app
from soarllm.serve.config import ServerConfig
from tests.serve.fake_engine import FakeEngine

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMP = {"prompt": "hi", "max_tokens": 4}


@pytest.fixture(scope="module")
def client():
    engine = AsyncLLMEngine(FakeEngine(max_model_len=256, fim=False))
    app = build_app(engine, ServerConfig(served_model_names=["fake"], access_log=False,
                                         max_body_bytes=64 * 1024))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _error(r, status: int, *words: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize("body, words, param", [
    ({**COMP, "foo": 1, "bar": 2}, ["unsupported", "bar", "foo"], None),
    ({**COMP, "max_tokens": "5"}, ["max_tokens"], "max_tokens"),
    ({**COMP, "max_tokens": -3}, ["max_tokens"], "max_tokens"),
    ({**COMP, "temperature": -1}, ["temperature"], "temperature"),
    ({**COMP, "temperature": 1e9}, ["temperature"], "temperature"),
    ({**COMP, "top_p": 7}, ["top_p"], "top_p"),
    ({**COMP, "n": 0}, ["n"], "n"),
    ({**COMP, "n": 10_000}, ["n"], "n"),
    ({**COMP, "logprobs": 99}, ["logprobs"], "logprobs"),
    ({**COMP, "presence_penalty": 5}, ["presence_penalty"], "presence_penalty"),
    ({**COMP, "seed": 2**80}, ["seed"], "seed"),
    ({**COMP, "stop": [""]}, ["stop"], "stop"),
    ({**COMP, "stop": 3}, ["stop"], "stop"),
    ({"max_tokens": 4}, ["missing", "prompt"], "prompt"),
    ({**COMP, "prompt": ""}, ["empty"], "prompt"),
    ({**COMP, "prompt": []}, ["empty"], "prompt"),
    ({**COMP, "prompt": [1, "a"]}, ["prompt"], "prompt"),
    ({**COMP, "prompt": [10**9, 5]}, ["token ids"], "prompt"),
    ({**COMP, "prompt": [-1]}, ["token ids"], "prompt"),
    ({**COMP, "max_tokens": 10**9}, ["context length"], "max_tokens"),
    ({**COMP, "prompt": "x" * 300}, ["context length"], None),
    ({**COMP, "logit_bias": {"5": 1.0}}, ["logit_bias"], "logit_bias"),
    ({**COMP, "best_of": 3}, ["best_of"], "best_of"),
    ({**COMP, "stream_options": {"include_usage": True}}, ["stream_options"], "stream_options"),
    ({**COMP, "suffix": "tail"}, ["fill-in-the-middle", "suffix"], "suffix"),
    ({**COMP, "max_tokens": 0}, ["echo"], "max_tokens"),
])
def test_completions_bad_input(client, body, words, param):
    _error(client.post("/v1/completions", json=body), 400, *words, param=param)


@pytest.mark.parametrize("body, words, param", [
    ({**CHAT, "messages": []}, ["messages"], "messages"),
    ({"max_tokens": 4}, ["missing", "messages"], "messages"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, ["role"], None),
    ({**CHAT, "messages": [{"content": "x"}]}, ["missing", "role"], None),
    ({**CHAT, "messages": "hello"}, ["messages"], "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, ["image_url"], None),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, ["tools"], "tools"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}}},
     ["cannot be enforced", "not"], "response_format"),
    ({**CHAT, "response_format": {"type": "json_object"}, "guided_regex": "a"},
     ["only one of"], "guided_regex"),
    ({**CHAT, "top_logprobs": 3}, ["logprobs"], "top_logprobs"),
    ({**CHAT, "max_completion_tokens": 0}, ["max_completion_tokens"], "max_completion_tokens"),
    ({**CHAT, "max_tokens": None, "max_completion_tokens": 10**9}, ["context length"], None),
    ({**CHAT, "frobnicate": True}, ["unsupported", "frobnicate"], "frobnicate"),
])
def test_chat_bad_input(client, body, words, param):
    _error(client.post("/v1/chat/completions", json=body), 400, *words, param=param)


def test_unknown_model_is_404_with_model_not_found(client):
    err = _error(client.post("/v1/completions", json={**COMP, "model": "gpt-9"}), 404,
                 "gpt-9", "fake", param="model")
    assert err["code"] == "model_not_found"
    _error(client.get("/v1/models/gpt-9"), 404, "gpt-9")


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"null", b"\xff\xfe"])
def test_invalid_json_bodies(client, content):
    r = client.post("/v1/chat/completions", content=content,
                    headers={"content-type": "application/json"})
    _error(r, 400)


def test_huge_body_is_413(client):
    r = client.post("/v1/completions", json={**COMP, "prompt": "x" * 100_000})
    _error(r, 413, "larger than")


def test_unknown_route_and_method(client):
    _error(client.get("/v1/nope"), 404, "no route")
    _error(client.get("/v1/completions"), 405)


def test_tgi_errors_have_tgi_shape(client):
    r = client.post("/generate", json={"inputs": "hi", "parameters": {"temperature": 0}})
    assert r.status_code == 422
    body = r.json()
    assert body["error_type"] == "validation" and "temperature" in body["error"]
    r = client.post("/generate", json={"inputs": "hi", "parameters": {"typical_p": 0.5}})
    assert r.status_code == 422 and "typical_p" in r.json()["error"]
    r = client.post("/generate", json={"inputs": "", "parameters": {}})
    assert r.status_code == 422 and "inputs" in r.json()["error"]


def test_server_still_serves_after_all_that(client):
    r = client.post("/v1/completions", json={**COMP, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " w0 "
    assert client.get("/health").json() == {"status": "ok"}
