"""The real default model (SmolLM2-135M: 9 query heads over 3 KV heads, so 3 ranks) split over
three worker processes, or three Ray actors, gives transformers' greedy tokens on the same
dequantized weights."""

from __future__ import annotations

import pytest

from soarllm import LLM, SamplingParams
from tests.hf_reference import hf_gguf, hf_greedy

pytestmark = pytest.mark.model

PROMPTS = ["def fibonacci(n):", "The capital of France is"]
N_TOKENS = 12


@pytest.fixture(params=["mp", "ray"])
def backend(request):
    if request.param == "ray":  # a local cluster of 3 logical CPUs: one bundle per rank
        ray = pytest.importorskip("ray")
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
        yield "ray"
        ray.shutdown()
    else:
        yield "mp"


def test_tp3_default_model_greedy_equals_transformers(default_model_path, backend):
    # transformers' reading of the GGUF and its greedy tokens: computed once for both backends
    tok, model = hf_gguf(default_model_path)
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    expected = [hf_greedy(default_model_path, ids, N_TOKENS) for ids in prompt_ids]
    whole = sum(p.numel() * p.element_size()
                for p in {p.data_ptr(): p for p in model.parameters()}.values())
    # quantization="none": the dequantized weights transformers runs (GGUF blocks do not shard)
    llm = LLM(str(default_model_path), dtype="float32", quantization="none",
              kv_cache_memory="64MiB", max_model_len=256, tensor_parallel_size=3,
              distributed_executor_backend=backend)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)
        ours = [o.outputs[0].token_ids for o in llm.generate([list(p) for p in prompt_ids], sp)]
        per_rank = llm.llm_engine.executor.collective_rpc("parameter_bytes")
    finally:
        llm.llm_engine.shutdown()
    assert ours == expected
    for b in per_rank:  # each rank holds about a third (the norms are replicated)
        assert 0.33 * whole < b < 0.34 * whole, (b, whole)
