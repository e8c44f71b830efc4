"""The registry code model (Qwen2.5-Coder-0.5B-Instruct, a qwen2 GGUF) against transformers'
greedy `generate` on the same dequantized GGUF weights (loaded once for the module):

- in process: our greedy continuations of raw code, a chat turn and a hand-built FIM prompt,
  batched together, equal transformers' token for token;
- over HTTP (`soar serve`, float32, unquantized): `suffix` on /v1/completions through the official
  `openai` client, and /infill (whole and streamed), each equal to transformers' greedy
  continuation of the prompt written out here from Qwen's FIM format and llama.cpp's /infill
  layout (never with our own prompt builders);
- llama.vim's own FIM request body (autoload/llama.vim) answered with the fields it asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from soarllm import LLM, SamplingParams
from tests.hf_reference import hf_gguf
from tests.serve.conftest import start_soar_serve

pytestmark = pytest.mark.model

MODEL = "qwen2.5-coder-0.5b-instruct"
N_TOKENS = 24  # 0.5B on two CPU cores: a few short generations
N_FIM = 20
RAW = [
    "def fib(n):",
    'def is_palindrome(s: str) -> bool:\n    """Return True if s reads the same backwards."""\n',
]
CHAT = ["Write a Python one-liner that reverses a list named xs."]
# Qwen2.5-Coder's FIM format, written out here from the model card (not with our fim_prompt).
FIM = ("<|fim_prefix|>def mean(xs):\n    <|fim_suffix|>\n    return total / len(xs)\n"
       "<|fim_middle|>")


@pytest.fixture(scope="module")
def qwen_path() -> Path:
    from soarllm import hub

    return Path(hub.pull(MODEL, progress=False))


@pytest.fixture(scope="module")
def hf_reference(qwen_path):
    return hf_gguf(qwen_path)  # shared with tests/serve/test_tool_calls.py


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of exactly n tokens (shared with the serving test)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=n, min_new_tokens=n,
        )
    return out[0, len(ids):].tolist()


def test_greedy_matches_transformers(qwen_path, hf_reference):
    tok, model = hf_reference
    # the vocabulary has Qwen's FIM tokens (transformers' reading of the GGUF says so)
    assert {"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"} <= set(tok.get_vocab())
    chats = [tok.apply_chat_template([{"role": "user", "content": c}],
                                     add_generation_prompt=True, tokenize=False) for c in CHAT]
    prompts = ([tok.encode(p) for p in RAW]
               + [tok.encode(c, add_special_tokens=False) for c in chats]
               + [tok.encode(FIM, add_special_tokens=False)])
    # quantization="none": the same dequantized weights transformers runs
    ours = LLM(str(qwen_path), dtype="float32", quantization="none", max_model_len=1024)
    ours_tok = ours.get_tokenizer()
    assert [ours_tok.encode(p) for p in RAW] == prompts[: len(RAW)]
    assert ours_tok.encode(FIM, add_special_tokens=False) == prompts[-1]
    params = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, min_tokens=N_TOKENS)
    outs = ours.generate(prompts, params)  # one continuous batch
    for ids, out in zip(prompts, outs):
        want = hf_greedy(model, ids, N_TOKENS)
        assert out.outputs[0].token_ids == want, tok.decode(ids)


# -- over HTTP -------------------------------------------------------------------------------

# A HumanEval-like function (HumanEval/0's signature and docstring) with its body missing.
PREFIX = (
    "from typing import List\n\n\n"
    "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
    '    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n'
    '    """\n'
)
SUFFIX = "    return False\n\n\nprint(has_close_elements([1.0, 2.8, 3.0], 0.3))\n"


@pytest.fixture(scope="module")
def qwen_server(qwen_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("qwen-serve") / "server.log"
    srv = start_soar_serve(MODEL, "--quantization", "none", "--max-model-len", "1024",
                           "--no-access-log", log_path=log, startup_timeout=600)
    yield srv
    srv.stop()


def test_fim_suffix_with_the_openai_client(qwen_server, hf_reference):
    tok, model = hf_reference
    # Qwen2.5-Coder's prefix-suffix-middle format, built by hand
    ids = tok.encode(f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
                     add_special_tokens=False)
    want = hf_greedy(model, ids, N_FIM)
    client = openai.OpenAI(base_url=qwen_server.base_url + "/v1", api_key="unused",
                           max_retries=0, timeout=600)
    r = client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=N_FIM,
                                  temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == N_FIM
    assert r.choices[0].text == tok.decode(want)
    assert "for " in r.choices[0].text  # a loop over the numbers: the model filled the body


def test_infill_like_llama_cpp(qwen_server, hf_reference):
    tok, model = hf_reference
    extra = [{"filename": "geometry.py", "text": "def distance(a, b):\n    return abs(a - b)\n"}]
    # llama.cpp's repo-level layout for a vocabulary with <|repo_name|> and <|file_sep|>
    want_prompt = ("<|repo_name|>myproject\n<|file_sep|>geometry.py\n" + extra[0]["text"]
                   + "<|file_sep|>filename\n<|fim_prefix|>" + PREFIX + "<|fim_suffix|>" + SUFFIX
                   + "<|fim_middle|>")
    ids = tok.encode(want_prompt, add_special_tokens=False)
    want = hf_greedy(model, ids, N_FIM)
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra,
            "n_predict": N_FIM, "temperature": 0, "return_tokens": True}
    r = httpx.post(qwen_server.base_url + "/infill", json=body, timeout=600)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["prompt"] == want_prompt and out["tokens_evaluated"] == len(ids)
    assert out["tokens"] == want
    assert out["content"] == tok.decode(want)
    assert (out["stop"], out["stop_type"], out["tokens_predicted"]) == (True, "limit", N_FIM)
    # streamed: llama.cpp's SSE events, joined, are the same answer (a prefix-cache hit now)
    with httpx.stream("POST", qwen_server.base_url + "/infill", json={**body, "stream": True},
                      timeout=600) as s:
        events = [json.loads(line[len("data: "):]) for line in s.iter_lines() if line]
    assert events[-1]["stop"] is True and not any(e["stop"] for e in events[:-1])
    assert "".join(e["content"] for e in events) == out["content"]
    assert events[-1]["tokens_cached"] > 0


def test_infill_answers_llama_vim(qwen_server):
    """The body llama.vim sends for a suggestion (autoload/llama.vim, field for field; sampled:
    top_k, top_p and llama.cpp's infill sampler, which this server accepts and does not apply)
    is answered with exactly the fields it asks for, and the suggestion keeps the body's
    indentation (n_indent) line after line, as llama.cpp's rule leaves it."""
    fields = ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
              "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
              "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
              "tokens_cached"]
    body = {
        "id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX,
        "input_extra": [{"filename": "geometry.py", "text": "def distance(a, b):\n"
                         "    return abs(a - b)\n"}],
        "prompt": "    for ", "n_predict": 16, "stop": [], "n_indent": 4, "top_k": 40,
        "top_p": 0.90, "samplers": ["top_k", "top_p", "infill"], "stream": False,
        "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1000,
        "response_fields": fields,
    }
    r = httpx.post(qwen_server.base_url + "/infill", json=body, timeout=600)
    assert r.status_code == 200, r.text
    out = r.json()
    assert sorted(out) == sorted(fields)
    assert 1 <= out["timings/predicted_n"] <= 16 and out["truncated"] is False
    assert out["timings/prompt_n"] > 0 and out["timings/prompt_ms"] > 0
    # every line after the first: indented by at least 4, except a last line cut where a
    # shorter one began (its indentation only) or not yet holding any text
    lines = out["content"].split("\n")
    for line in lines[1:-1]:
        assert len(line) - len(line.lstrip(" \t")) >= 4 and line.strip(), out["content"]
    if len(lines) > 1:
        last = lines[-1]
        assert not last.strip() or len(last) - len(last.lstrip(" \t")) >= 4, out["content"]
