"""The second real model: Gemma 3 270M (GGUF Q4_K_M), greedy output equal to transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soarllm import LLM, SamplingParams
from tests.hf_reference import hf_gguf

pytestmark = [pytest.mark.model, pytest.mark.slow]

PROMPTS = ["The capital of France is", "def is_prime(n):", "Water boils at"]
N_TOKENS = 32


def test_gemma3_greedy_matches_transformers():
    from soarllm import hub

    path = Path(hub.pull("gemma3-270m", progress=False))
    ours = LLM(str(path), dtype="float32", max_model_len=512, quantization="none")
    tok = ours.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    got = ours.generate(prompts, SamplingParams(temperature=0.0, max_tokens=N_TOKENS,
                                                min_tokens=N_TOKENS))
    _, hf = hf_gguf(path)
    for ids, out in zip(prompts, got):
        with torch.inference_mode():
            want = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=N_TOKENS,
                               min_new_tokens=N_TOKENS)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want, tok.decode(ids)
