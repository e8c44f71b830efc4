"""The official `openai` client and TGI routes against `soar serve` with the real default model
(SmolLM2-135M-Instruct). Outputs are kept short: this model runs on CPU in CI."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(model_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=model_server.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_stream_joins_and_usage(client, model_server):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.choices[0].text.strip()
    count = httpx.post(model_server.base_url + "/tokenize", json={"prompt": PROMPT}).json()
    assert whole.usage.prompt_tokens == count["count"] == chunks[-1].usage.prompt_tokens
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens
    assert 1 <= whole.usage.completion_tokens <= 8


def test_chat_stream_joins_and_logprobs(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    text = whole.choices[0].message.content
    assert "Paris" in text
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == text
    # the end-of-turn token counts in usage but has no text
    assert len(content) in (whole.usage.completion_tokens, whole.usage.completion_tokens - 1)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               for t in content)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_completion_logprobs_and_stop(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == r.usage.completion_tokens
    words = r.choices[0].text.split()
    assert len(words) >= 2
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                        temperature=0, stop=[words[1]])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == r.choices[0].text[: r.choices[0].text.index(words[1])]


def test_n2_seed_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, n=2, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 2
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_fim_suffix_is_refused(client, default_model_path):
    """SmolLM2's vocabulary has no fill-in-the-middle tokens (transformers' own reading of the
    GGUF says so), so a request with 'suffix' must be refused, naming the parameter."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_path.parent),
                                        gguf_file=default_model_path.name)
    assert not [t for t in tok.get_vocab() if "fim" in t.lower()]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="def add(a, b):\n    return ",
                                  suffix="\n\nprint(add(1, 2))", max_tokens=4, temperature=0)
    assert e.value.status_code == 400
    assert "fill-in-the-middle" in str(e.value) and e.value.body["param"] == "suffix"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client calls pydantic's .dict()
def test_tgi_generate_and_client(model_server):
    r = httpx.post(model_server.base_url + "/generate", timeout=300, json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["details"]["generated_tokens"] == len(out["details"]["tokens"]) <= 4
    import text_generation as tg  # CI: pip install --no-deps text-generation "aiohttp>=3.8,<4"
    client = tg.Client(model_server.base_url, timeout=300)
    resp = client.generate(PROMPT, max_new_tokens=4)
    assert resp.generated_text == out["generated_text"]
