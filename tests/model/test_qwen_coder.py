"""The registry code model (Qwen2.5-Coder-0.5B-Instruct, a qwen2 GGUF): our greedy continuations
equal transformers' greedy `generate` on the same dequantized GGUF weights, token for token, for
raw code, a chat turn and a hand-built fill-in-the-middle prompt, batched together."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soarllm import LLM, SamplingParams

pytestmark = pytest.mark.model

MODEL = "qwen2.5-coder-0.5b-instruct"
N_TOKENS = 24  # 0.5B on two CPU cores: a few short generations
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = str(qwen_path.parent), qwen_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


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
