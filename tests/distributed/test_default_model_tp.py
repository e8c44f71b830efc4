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
    # quantization="none": the dequantized weights transformers runs (the blocks: see below)
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


def test_tp3_default_model_served_on_its_blocks(default_model_path):
    """The GGUF served quantized (its Q4_1 blocks repacked exactly, no quantization="none") over
    three ranks: each rank's blocks are its slice of the file's, cut on block boundaries, so
    every rank computes with exactly its slice of one rank's weights; the ranks' partial sums
    are rounded in bfloat16, so one rank's greedy continuations score alike, not bit for bit."""
    import torch

    from soarllm.distributed.worker import dequantized_weight

    common = dict(dtype="bfloat16", kv_cache_memory="64MiB", max_model_len=256)
    one = LLM(str(default_model_path), **common)
    model = one.llm_engine.executor.runner.model
    layers = {"model.layers.3.self_attn.qkv_proj": 0, "model.layers.3.self_attn.o_proj": 1,
              "model.layers.3.mlp.down_proj": 1}  # column parallel: rows; row parallel: columns
    ref = {name: dequantized_weight(model.get_submodule(name)) for name in layers}
    sp = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)
    seqs = [o.prompt_token_ids + o.outputs[0].token_ids for o in one.generate(PROMPTS, sp)]
    score = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def scored(llm):
        return [torch.tensor([next(iter(lp.values())).logprob for lp in o.prompt_logprobs[1:]])
                for o in llm.generate(seqs, score)]

    ref_scores = scored(one)
    assert "W4A16" in model.get_submodule("model.layers.3.mlp.down_proj").extra_repr()
    del one, model
    llm = LLM(str(default_model_path), **common, tensor_parallel_size=3)
    try:
        for name, dim in layers.items():
            full = ref[name]
            for r, w in enumerate(llm.llm_engine.executor.collective_rpc("dequantized_weight",
                                                                         name)):
                if dim == 1:
                    n = full.shape[1] // 3
                    want = full[:, r * n:(r + 1) * n]
                else:  # q, k and v rows of this rank, side by side
                    q, kv = 576, 192  # 9 heads of 64 over 3 KV heads: per rank 3 + 1 + 1 heads
                    parts = (full[:q], full[q:q + kv], full[q + kv:])
                    want = torch.cat([p[r * p.shape[0] // 3:(r + 1) * p.shape[0] // 3]
                                      for p in parts])
                torch.testing.assert_close(w, want, atol=0, rtol=0)
        ours = scored(llm)
    finally:
        llm.llm_engine.shutdown()
    # bfloat16 partial sums: the unquantized model at TP=3 scores within 0.16-0.19 of TP=1 too;
    # with int8 activations (AVX-512 VNNI) a differently rounded partial sum can also move an
    # activation across an int8 step of the next layer
    from soarllm.quant.w4a16 import int8_activations_by_default

    # (measured: bfloat16 activations largest 0.19, mean 0.04; int8 largest 0.36, mean 0.08)
    worst, mean = (0.5, 0.1) if int8_activations_by_default() else (0.35, 0.05)
    diffs = torch.cat([(a - b).abs() for a, b in zip(ours, ref_scores)])
    print(f"TP=3 vs TP=1 log-probs: largest difference {diffs.max():.3f}, mean {diffs.mean():.4f}")
    for a, b in zip(ours, ref_scores):
        torch.testing.assert_close(a, b, atol=worst, rtol=0)
    assert diffs.mean() < mean
