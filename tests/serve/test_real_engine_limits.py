"""Context length and token-id validation over HTTP against a real `soar serve` (tiny random
Llama). The limits come from the checkpoint's own config.json (max_position_embeddings,
vocab_size), the accepted requests' outputs from transformers on the same checkpoint."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch


@pytest.fixture(scope="module")
def limits(tiny_model_dir) -> tuple[int, int]:
    """(context length, vocabulary size) as the checkpoint declares them."""
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    return cfg["max_position_embeddings"], cfg["vocab_size"]


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return tok, model


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]  # 0..2 are the special tokens


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=300)


def completion(server, prompt, **kw) -> httpx.Response:
    return post(server, "/v1/completions", {"model": "tiny", "prompt": prompt,
                                            "temperature": 0, "ignore_eos": True, **kw})


def error(r: httpx.Response, *words: str, param: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    for w in words:
        assert w in err["message"].lower(), err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def hf_next_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].double()


def test_models_report_the_checkpoints_context_length(tiny_server, limits):
    card = httpx.get(tiny_server.base_url + "/v1/models").json()["data"][0]
    assert card["id"] == "tiny" and card["max_model_len"] == limits[0]


def test_token_ids_outside_the_vocabulary_are_refused(tiny_server, limits, hf):
    _, vocab = limits
    for prompt in ([vocab], [5, vocab + 1000], [-1], [5, -7]):
        error(completion(tiny_server, prompt, max_tokens=2), "token", param="prompt")
    error(completion(tiny_server, [5, 6], max_tokens=2, stop_token_ids=[vocab]),
          "token", param="stop_token_ids")
    # the largest id is a token: its greedy continuation is transformers'
    _, model = hf
    ids = [vocab - 1, 5, vocab - 2]
    r = completion(tiny_server, ids, max_tokens=3)
    assert r.status_code == 200, r.text
    want: list[int] = []
    for _ in range(3):
        want.append(int(hf_next_logits(model, ids + want).argmax()))
    tok, _ = hf
    assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)


def test_prompt_plus_max_tokens_must_fit_the_context(tiny_server, limits, hf):
    context, vocab = limits
    _, model = hf
    # a prompt that fills the context leaves no room for a token
    error(completion(tiny_server, random_ids(context, vocab), max_tokens=1), "context length")
    error(completion(tiny_server, random_ids(context + 50, vocab), max_tokens=1),
          "context length")
    # one token of room: exactly one token, the one transformers ranks first
    ids = random_ids(context - 1, vocab, seed=1)
    r = completion(tiny_server, ids, max_tokens=1)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == context - 1
    assert body["usage"]["completion_tokens"] == 1
    logits = hf_next_logits(model, ids)
    tok, _ = hf
    # (a float near-tie over 4095 positions may pick either of two tokens)
    best = (logits >= logits.max() - 1e-4).nonzero().flatten().tolist()
    assert body["choices"][0]["text"] in [tok.decode([t], skip_special_tokens=True) for t in best]
    # prompt + max_tokens == context is accepted and runs to its length; one more is refused
    ids = random_ids(context - 10, vocab, seed=2)
    r = completion(tiny_server, ids, max_tokens=10)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 10
    assert r.json()["choices"][0]["finish_reason"] == "length"
    error(completion(tiny_server, ids, max_tokens=11), "context length", param="max_tokens")


def test_chat_and_tgi_prompts_longer_than_the_context_are_refused(tiny_server, limits, hf):
    context, _ = limits
    tok, _ = hf
    content = "value = 1\n" * context
    messages = [{"role": "user", "content": content}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
    assert len(rendered) > context
    r = post(tiny_server, "/v1/chat/completions",
             {"model": "tiny", "messages": messages, "max_completion_tokens": 1})
    error(r, "context length")
    r = post(tiny_server, "/generate", {"inputs": content, "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and "context length" in r.json()["error"]


def test_server_serves_after_refusals(tiny_server, hf):
    tok, model = hf
    ids = tok("x = 1\n")["input_ids"]
    want: list[int] = []
    for _ in range(8):
        want.append(int(hf_next_logits(model, ids + want).argmax()))
    r = completion(tiny_server, "x = 1\n", max_tokens=8)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
    assert httpx.get(tiny_server.base_url + "/health").json()["status"] == "ok"
