"""The engine on a CUDA GPU: the fast path (Triton attention, fused kernels, CUDA graphs) gives the
tokens transformers gives on the same weights, and the same tokens as the reference backend run
eagerly; weight-only int4 through the Triton GEMV stays close to its own dequantized weights.

Skipped without a GPU (run with ``pytest -m gpu`` where one is present)."""

from __future__ import annotations

import pytest
import torch

from soarllm import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = [
    "def quicksort(arr):",
    "import os\nimport sys\n\nclass Parser:\n    def __init__(self, text):",
    "for i in range(10):",
    "x",
    "return json.dumps(",
]
N = 40


def _ids(llm: LLM) -> list[list[int]]:
    tok = llm.get_tokenizer()
    return [tok.encode(p) for p in PROMPTS]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    sp = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]


def _hf_greedy(model_dir, prompts, dtype) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).cuda().eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device="cuda")
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N,
                               min_new_tokens=N, do_sample=False, pad_token_id=0)
            out.append(y[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def fast(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), device="cuda", dtype="float32", enforce_eager=False,
              attention_backend="triton", max_num_seqs=8)
    yield llm


def test_fast_path_is_on(fast):
    runner = fast.llm_engine.executor.runner
    assert runner.backend.name == "triton"
    assert runner.graphs is not None, "CUDA graphs were not captured"


def test_fast_path_matches_transformers(fast, tiny_llama_dir):
    prompts = _ids(fast)
    torch.backends.cuda.matmul.allow_tf32 = False
    assert _greedy(fast, prompts) == _hf_greedy(tiny_llama_dir, prompts, torch.float32)


def test_fast_path_matches_reference_backend(fast, tiny_llama_dir):
    prompts = _ids(fast)
    ref = LLM(str(tiny_llama_dir), device="cuda", dtype="float32", enforce_eager=True,
              attention_backend="reference")
    assert _greedy(fast, prompts) == _greedy(ref, prompts)


def test_bfloat16_fast_path_matches_transformers(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), device="cuda", dtype="bfloat16", enforce_eager=False,
              attention_backend="triton", max_num_seqs=8)
    prompts = _ids(llm)
    ours, theirs = _greedy(llm, prompts), _hf_greedy(tiny_llama_dir, prompts, torch.bfloat16)
    # bfloat16 rounding differs between kernels: most continuations agree whole, the rest share
    # a long prefix
    whole = sum(a == b for a, b in zip(ours, theirs))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), N)
              for a, b in zip(ours, theirs)]
    assert whole >= len(PROMPTS) // 2 + 1 and min(prefix) >= N // 4, (ours, theirs)


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16-g32"])
def test_weight_only_quantized_on_gpu(tiny_llama_dir, scheme):
    """The Triton weight-only kernels against the same quantization run eagerly through the
    reference dequantize-and-matmul path on the CPU."""
    sp = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    gpu = LLM(str(tiny_llama_dir), device="cuda", dtype="bfloat16", quantization=scheme,
              enforce_eager=False, attention_backend="triton", max_num_seqs=8)
    cpu = LLM(str(tiny_llama_dir), device="cpu", dtype="bfloat16", quantization=scheme)
    prompts = _ids(gpu)
    a = [o.outputs[0].token_ids for o in gpu.generate(prompts, sp)]
    b = [o.outputs[0].token_ids for o in cpu.generate(prompts, sp)]
    prefix = [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), N) for u, v in zip(a, b)]
    assert sum(p == N for p in prefix) >= len(PROMPTS) // 2 + 1 and min(prefix) >= N // 4, (a, b)
