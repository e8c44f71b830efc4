"""TGI routes over plain HTTP and through the `text-generation` client."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY_TEXT = "".join(f" w{i}" for i in range(40))


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def test_generate_plain_http(fake_server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 7, "details": True,
                                              "decoder_input_details": True, "top_n_tokens": 2}}
    r = httpx.post(fake_server.base_url + "/generate", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["generated_text"] == GREEDY_TEXT[:7]
    d = out["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 7
    assert [t["text"] for t in d["tokens"]] == list(GREEDY_TEXT[:7])
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in d["tokens"])
    assert len(d["prefill"]) == 5 and d["prefill"][0]["logprob"] is None
    assert len(d["top_tokens"]) == 7 and all(len(t) == 2 for t in d["top_tokens"])


def test_generate_without_details_and_full_text(fake_server):
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 3, "return_full_text": True}}
    out = httpx.post(fake_server.base_url + "/generate", json=body, headers=AUTH).json()
    assert out == {"generated_text": "Hi" + GREEDY_TEXT[:3]}


def test_generate_stream_plain_http(fake_server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 9, "stop": ["w2"]}}
    with httpx.stream("POST", fake_server.base_url + "/generate_stream", json=body,
                      headers=AUTH) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert all(e["generated_text"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == " w0 w1 "
    assert last["details"]["finish_reason"] == "stop_sequence"
    assert last["details"]["generated_tokens"] == len(events)


def test_compat_route_returns_a_list(fake_server):
    r = httpx.post(fake_server.base_url + "/", json={"inputs": "a",
                                                      "parameters": {"max_new_tokens": 2}},
                   headers=AUTH)
    assert r.status_code == 200 and r.json() == [{"generated_text": GREEDY_TEXT[:2]}]


def test_sampling_seed_is_reproducible(fake_server):
    body = {"inputs": "a", "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": 4,
                                          "details": True}}
    a = httpx.post(fake_server.base_url + "/generate", json=body, headers=AUTH).json()
    b = httpx.post(fake_server.base_url + "/generate", json=body, headers=AUTH).json()
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client calls pydantic's .dict()
def test_text_generation_client(fake_server):
    import text_generation as tg  # CI: pip install --no-deps text-generation "aiohttp>=3.8,<4"
    client = tg.Client(fake_server.base_url, headers=AUTH, timeout=30)
    resp = client.generate("Hello", max_new_tokens=6, decoder_input_details=True)
    assert resp.generated_text == GREEDY_TEXT[:6]
    assert resp.details.finish_reason.value == "length"
    assert len(resp.details.tokens) == 6
    streamed = list(client.generate_stream("Hello", max_new_tokens=6))
    assert "".join(s.token.text for s in streamed) == resp.generated_text
    assert streamed[-1].generated_text == resp.generated_text
    stopped = client.generate("Hello", max_new_tokens=20, stop_sequences=["w1"])
    assert stopped.generated_text == " w0 " and stopped.details.finish_reason.value == \
        "stop_sequence"
    with pytest.raises(tg.errors.ValidationError):
        client.generate("Hello", max_new_tokens=10**9)
    bad = tg.Client(fake_server.base_url, headers={"Authorization": "Bearer wrong"})
    with pytest.raises(Exception, match="API key"):
        bad.generate("Hello", max_new_tokens=2)
