"""The real default model: our greedy continuations equal transformers' greedy `generate` on the
same dequantized GGUF weights, token for token, for raw and chat prompts, alone and batched."""

from __future__ import annotations

import pytest
import torch

from soarllm import LLM, SamplingParams
from tests.hf_reference import hf_gguf

pytestmark = pytest.mark.model

N_TOKENS = 64
RAW = [
    "def quicksort(arr):",
    "The capital of France is",
    "import numpy as np\n\n# compute the moving average of a 1-D array\ndef moving_average(x, w):",
    "Once upon a time, in a small village by the sea,",
    "SELECT name, COUNT(*) FROM orders",
    "The three laws of thermodynamics are",
]
CHAT = [
    "Write a Python function that checks whether a string is a palindrome.",
    "What is the difference between a list and a tuple in Python?",
    "Give me three tips for writing readable code.",
    "Explain recursion to a ten-year-old.",
    "Translate 'good morning' into French and Spanish.",
]


@pytest.fixture(scope="module")
def hf_reference(default_model_path):
    return hf_gguf(default_model_path)


@pytest.fixture(scope="module")
def ours(default_model_path):
    # quantization="none": the same dequantized weights transformers runs (served quantized, the
    # GGUF differs by the kernel's rounding; tests/quant checks that path)
    return LLM(str(default_model_path), dtype="float32", quantization="none")


def _hf_greedy(tok, model, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS,
        )
    return out[0, len(ids):].tolist()


def test_greedy_continuations_match_transformers(hf_reference, ours):
    tok, model = hf_reference
    chats = [
        tok.apply_chat_template(
            [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False
        )
        for c in CHAT
    ]
    prompts = [tok.encode(p) for p in RAW] + [tok.encode(c, add_special_tokens=False) for c in chats]
    # Our tokenizer and chat template agree with transformers' on the same GGUF.
    ours_tok = ours.get_tokenizer()
    assert [ours_tok.encode(p) for p in RAW] == prompts[: len(RAW)]
    params = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, min_tokens=N_TOKENS)
    batched = ours.generate(prompts, params)  # all 11 in one continuous batch
    for ids, out in zip(prompts, batched):
        want = _hf_greedy(tok, model, ids)
        assert out.outputs[0].token_ids == want, tok.decode(ids)
