"""/infill on a real `soar serve` (a tiny random Llama whose tokenizer has StarCoder's FIM tokens),
judged by transformers running the same checkpoint:

- ``n_probs``: llama.cpp's ``completion_probabilities`` (tools/server/README.md, /completion's
  response format: per generated token its id, token, bytes and logprob, and ``top_logprobs``,
  the n most likely tokens) hold transformers' log-softmax of the logits at each generated
  position, the top tokens in its order, and each token's bytes as the byte-level BPE alphabet
  spells them (transformers' own ``bytes_to_unicode``); streamed chunks carry the same entries;
- llama.vim's warm-up request (``n_predict: 0``, its exact body from autoload/llama.vim's ring
  update) answers nothing and leaves the prompt in the prefix cache: the next completion that
  shares it finds it cached, where the same completion without a warm-up finds nothing.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tests.serve.conftest import start_soar_serve

FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
PREFIX = "def parse(self, args):\n    "
SUFFIX = "\n    return result\n"
N = 8
BYTE_OF = {ch: b for b, ch in bytes_to_unicode().items()}


@pytest.fixture(scope="module")
def fim_model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import make_tiny_model

    d = make_tiny_model(tmp_path_factory.mktemp("infill-tiny"), "llama")
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_special_tokens({"additional_special_tokens": list(FIM)})
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    torch.manual_seed(1)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf(fim_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fim_model_dir)
    model = AutoModelForCausalLM.from_pretrained(fim_model_dir, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def server(fim_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("infill-serve") / "server.log"
    srv = start_soar_serve(str(fim_model_dir), "--no-access-log", "--served-model-name", "fim",
                           "--dtype", "float32", log_path=log)
    yield srv
    srv.stop()


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/infill", json=body, timeout=300)


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def _check_entry(tok, e: dict) -> None:
    """An entry's token and bytes are those of its id in transformers' tokenizer."""
    want = bytes(BYTE_OF[ch] for ch in tok.convert_ids_to_tokens(e["id"]))
    assert e["bytes"] == list(want)
    assert e["token"] == want.decode("utf-8", errors="replace")


@pytest.mark.parametrize("n_probs", [1, 5])
def test_n_probs_are_the_model_distribution(server, hf, n_probs):
    tok, model = hf
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": N, "temperature": 0,
            "ignore_eos": True, "n_probs": n_probs, "return_tokens": True}
    r = _post(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    # the FIM prompt as llama.cpp's README lays it out, tokenized by transformers
    prompt = tok.encode(FIM[0] + PREFIX + FIM[1] + SUFFIX + FIM[2], add_special_tokens=False)
    assert out["prompt"] == tok.decode(prompt)
    generated = out["tokens"]
    probs = out["completion_probabilities"]
    assert len(generated) == len(probs) == N
    lp = _hf_logprobs(model, prompt + generated)
    for j, e in enumerate(probs):
        row = lp[len(prompt) - 1 + j]
        assert e["id"] == generated[j]
        assert e["logprob"] == pytest.approx(float(row[e["id"]]), abs=1e-3)
        top = torch.topk(row, n_probs)
        assert [t["id"] for t in e["top_logprobs"]] == top.indices.tolist()
        for t, v in zip(e["top_logprobs"], top.values.tolist()):
            assert t["logprob"] == pytest.approx(v, abs=1e-3)
            _check_entry(tok, t)
        _check_entry(tok, e)
        assert e["top_logprobs"][0]["id"] == e["id"]  # greedy: the most likely token

    # streamed: each chunk carries its own tokens' entries; the last event none
    entries, last = [], None
    with httpx.stream("POST", server.base_url + "/infill", json={**body, "stream": True},
                      timeout=300) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["stop"]:
                    last = event
                else:
                    assert len(event["completion_probabilities"]) == len(event["tokens"])
                    entries += event["completion_probabilities"]
    assert last is not None and "completion_probabilities" not in last
    assert [e["id"] for e in entries] == [e["id"] for e in probs]
    for a, b in zip(entries, probs):
        assert [t["id"] for t in a["top_logprobs"]] == [t["id"] for t in b["top_logprobs"]]
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_without_n_probs_there_are_none(server):
    r = _post(server, {"input_prefix": PREFIX, "n_predict": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert "completion_probabilities" not in r.json()


def _extra(tag: str) -> list[dict]:
    """Context chunks as llama.vim's ring buffer sends them (text, time, filename)."""
    text = "".join(f"def {tag}_{i}(x):\n    return x * {i} + len(x)\n\n" for i in range(12))
    return [{"text": text, "time": [1732000000, 5000], "filename": f"{tag}.py"}]


def _warm_up(server, extra: list[dict]) -> httpx.Response:
    # llama.vim's ring update request (autoload/llama.vim), as it sends it
    return _post(server, {
        "id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": extra,
        "prompt": "", "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False,
        "cache_prompt": True, "t_max_prompt_ms": 1, "t_max_predict_ms": 1,
        "response_fields": [""],
    })


def _complete(server, extra: list[dict]) -> dict:
    r = _post(server, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra,
                       "n_predict": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_llama_vim_warm_up_answers_nothing_and_caches_the_prompt(server):
    r = _warm_up(server, _extra("warm"))
    assert r.status_code == 200, r.text
    assert r.json() == {}  # response_fields [""]: no field
    after_warm_up = _complete(server, _extra("warm"))
    cold = _complete(server, _extra("cold"))  # the same request, never warmed up
    # cold: at most the snippet line shared with earlier prompts; warmed up: the context chunk
    assert cold["tokens_cached"] < after_warm_up["tokens_cached"]
    assert after_warm_up["tokens_cached"] > after_warm_up["tokens_evaluated"] // 2
    assert after_warm_up["timings"]["cache_n"] == after_warm_up["tokens_cached"]
    assert after_warm_up["timings"]["prompt_n"] < cold["timings"]["prompt_n"]


def test_warm_up_whole_answer_is_empty(server):
    r = _post(server, {"input_extra": _extra("shape"), "n_predict": 0, "return_tokens": True,
                       "n_probs": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["content"] == "" and out["tokens"] == [] and out["tokens_predicted"] == 0
    assert out["stop"] is True and out["stop_type"] == "limit"
    assert out["timings"]["predicted_n"] == 0 and out["tokens_evaluated"] > 0
    # streamed: only the last event, empty
    with httpx.stream("POST", server.base_url + "/infill", timeout=300,
                      json={"input_extra": _extra("shape2"), "n_predict": 0, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert len(events) == 1 and events[0]["stop"] is True and events[0]["content"] == ""
