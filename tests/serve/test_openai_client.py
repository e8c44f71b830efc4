"""The official `openai` client against a live server (real app + async engine, fake model)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY

GREEDY_TEXT = "".join(f" w{i}" for i in range(40))


@pytest.fixture(scope="module")
def client(fake_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_server.base_url + "/v1", api_key=API_KEY, max_retries=0)


def _n_tokens(fake_server, text: str) -> int:
    return len(fake_server.fake.tokenizer.encode(text))


def _wait_idle(fake, timeout=5.0):
    deadline = time.time() + timeout
    while (fake.requests or fake.free_blocks != fake.num_blocks) and time.time() < deadline:
        time.sleep(0.01)
    return not fake.requests and fake.free_blocks == fake.num_blocks


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["fake-model", "fake-alias"]
    assert client.models.retrieve("fake-alias").id == "fake-alias"


def test_completion_greedy_and_usage(client, fake_server):
    r = client.completions.create(model="fake-model", prompt="Hello there", max_tokens=10,
                                  temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == GREEDY_TEXT[:10]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == _n_tokens(fake_server, "Hello there")
    assert r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_completion_stream_joins_to_non_stream(client):
    kw = dict(model="fake-alias", prompt="abc", max_tokens=17, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 17
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_joins_to_non_stream(client, fake_server):
    kw = dict(model="fake-model", messages=[{"role": "user", "content": "Say something"}],
              max_completion_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == GREEDY_TEXT[:12]
    assert whole.usage.completion_tokens == 12
    rendered = fake_server.fake.tokenizer.apply_chat_template(
        kw["messages"], tokenize=False, add_generation_prompt=True)
    assert whole.usage.prompt_tokens == _n_tokens(fake_server, rendered)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_logprobs_legacy_format(client):
    r = client.completions.create(model="fake-model", prompt="hi", max_tokens=6, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)


def test_completion_echo_with_logprobs(client):
    r = client.completions.create(model="fake-model", prompt="hey", max_tokens=3, temperature=0,
                                  logprobs=1, echo=True)
    c = r.choices[0]
    assert c.text == "hey" + GREEDY_TEXT[:3]
    assert c.logprobs.token_logprobs[0] is None and len(c.logprobs.tokens) == 6
    scored = client.completions.create(model="fake-model", prompt="hey", max_tokens=0,
                                       echo=True, logprobs=0)
    assert scored.choices[0].text == "hey" and scored.usage.completion_tokens == 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 2


def test_n2_and_multiple_prompts(client):
    r = client.completions.create(model="fake-model", prompt=["a", "b"], max_tokens=5, n=2,
                                  temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 20
    chat = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=8, n=2,
        temperature=1.0, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content
    chunks = list(client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=8, n=2,
        temperature=1.0, seed=5, stream=True))
    for i in (0, 1):
        streamed = "".join(c.delta.content or "" for ch in chunks for c in ch.choices
                           if c.index == i)
        assert streamed == chat.choices[i].message.content


def test_stop(client):
    r = client.completions.create(model="fake-model", prompt="s", max_tokens=30, temperature=0,
                                  stop=["w2"])
    assert r.choices[0].text == " w0 w1 " and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="fake-model", prompt="s", max_tokens=30,
                                            temperature=0, stop="w2", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == " w0 w1 "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducibility(client):
    kw = dict(model="fake-model", prompt="r", max_tokens=16, temperature=1.0)
    a = client.completions.create(**kw, seed=11).choices[0].text
    b = client.completions.create(**kw, seed=11).choices[0].text
    c = client.completions.create(**kw, seed=12).choices[0].text
    assert a == b and a != c


def test_fim_with_suffix_uses_the_tokenizers_fim_tokens(client, fake_server):
    fake = fake_server.fake
    r = client.completions.create(model="fake-model", prompt="def f(", suffix="\n    return x",
                                  max_tokens=4, temperature=0)
    pre, suf, mid = fake.tokenizer.convert_tokens_to_ids(
        ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"])
    ids = fake.last_prompt_ids
    enc = fake.tokenizer.encode
    assert ids == [pre, *enc("def f("), suf, *enc("\n    return x"), mid]
    assert r.usage.prompt_tokens == len(ids)


def test_auth(fake_server):
    url = fake_server.base_url
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for path, body in (("/v1/completions", {"prompt": "x"}), ("/generate", {"inputs": "x"})):
            r = httpx.post(url + path, json=body, headers=headers)
            assert r.status_code == 401, (path, key)
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).is_success
    bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # only the health probe stays open (tests/serve/test_hardening.py covers --public-metrics)
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 401


def test_client_disconnect_mid_stream_aborts_and_frees_kv(fake_server):
    fake = fake_server.fake
    assert _wait_idle(fake)
    body = {"model": "fake-model", "prompt": "go", "max_tokens": 5000, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", fake_server.base_url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert fake.requests  # running
    assert _wait_idle(fake)


def test_client_disconnect_without_stream_aborts(fake_server):
    fake = fake_server.fake
    assert _wait_idle(fake)
    body = {"model": "fake-model", "prompt": "go", "max_tokens": 5000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake_server.base_url + "/v1/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert _wait_idle(fake)


def test_api_errors_through_the_client(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fake-model", messages=[], max_tokens=2)
    assert "messages" in str(e.value)
