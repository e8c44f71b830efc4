"""KV cache offload to host memory (model/kv_offload.py): the engine with ``kv_offload`` against
the same engine without it (itself tested against transformers), and what it stages per step.

On the CPU "host" and "device" are one memory, so what is checked here is the mechanism: each
layer attends over a staged copy of only the step's blocks, renumbered, and the blocks it wrote go
back; the results must be exactly those of attending over the whole cache."""

from __future__ import annotations

import pytest
import torch

from soarllm import LLM, SamplingParams


def _run(llm, prompts, prompt_logprobs=True):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0,
                            prompt_logprobs=0 if prompt_logprobs else None)
    outs = llm.generate(prompts, params)
    result = []
    for o in outs:
        c = o.outputs[0]
        prompt = ([lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
                  if prompt_logprobs else [])
        sampled = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]
        result.append((c.token_ids, torch.tensor(prompt + sampled, dtype=torch.float64)))
    return result


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_offloaded_kv_gives_exactly_the_results_of_the_resident_cache(tiny_model_dir,
                                                                      kv_cache_dtype, backend):
    gen = torch.Generator().manual_seed(5)
    long_prompt = torch.randint(3, 500, (90,), generator=gen).tolist()
    first = [long_prompt, torch.randint(3, 500, (7,), generator=gen).tolist()]
    # a prefix-cache hit on the long prompt's blocks, read back from the host
    later = [long_prompt[:64] + torch.randint(3, 500, (10,), generator=gen).tolist()]
    common = dict(dtype="float32", kv_cache_memory="4MiB", block_size=8,
                  max_num_batched_tokens=32, enforce_eager=True, kv_cache_dtype=kv_cache_dtype,
                  attention_backend=backend)
    resident = LLM(str(tiny_model_dir), **common)
    want = _run(resident, first) + _run(resident, later, prompt_logprobs=False)
    resident.llm_engine.shutdown()

    offloaded = LLM(str(tiny_model_dir), kv_offload=True, **common)
    got = _run(offloaded, first) + _run(offloaded, later, prompt_logprobs=False)
    engine = offloaded.llm_engine
    runner = engine.executor.runner
    assert engine.kv.prefix_cache_hits >= 64
    # each layer staged only a step's blocks, far fewer than the cache holds
    num_blocks = engine.cache_config.num_blocks
    assert 0 < runner.offload.peak_staged_blocks <= -(-(90 + 12) // 8) + -(-(7 + 12) // 8)
    assert runner.offload.peak_staged_blocks < num_blocks
    assert all(c.device.type == "cpu" for c in runner.kv_caches)
    offloaded.llm_engine.shutdown()
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want):
        assert tokens == want_tokens
        torch.testing.assert_close(lps, want_lps, atol=0, rtol=0)


@pytest.mark.parametrize("spec", [{"method": "ngram", "num_speculative_tokens": 3},
                                  {"method": "lookahead"}], ids=["ngram", "lookahead"])
def test_offload_with_speculative_verification_rows(tiny_model_dir, spec):
    # verification writes several slots per request and rejected drafts' KV stays behind;
    # lookahead moves an accepted candidate's KV within the (host) cache
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10, 11, 9, 10]]
    common = dict(dtype="float32", kv_cache_memory="4MiB", block_size=8, enforce_eager=True,
                  speculative_config=spec)
    want = _run(LLM(str(tiny_model_dir), **common), prompts)
    got = _run(LLM(str(tiny_model_dir), kv_offload=True, **common), prompts)
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want):
        assert tokens == want_tokens
        # how many drafts a step verifies follows measured step times, so the two runs may batch
        # the rows differently: float32 rounding, not exact equality
        torch.testing.assert_close(lps, want_lps, atol=1e-5, rtol=0)


def test_offload_refuses_context_parallel(tiny_model_dir):
    from soarllm.errors import ConfigError

    with pytest.raises(ConfigError, match="kv_offload with context_parallel_size"):
        LLM(str(tiny_model_dir), kv_offload=True, context_parallel_size=2, dtype="float32",
            kv_cache_memory="4MiB")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", [None, {"method": "lookahead"}], ids=["plain", "lookahead"])
def test_cuda_offload_keeps_the_cache_on_the_host_and_matches(tiny_model_dir, spec):
    # CUDA: the caches are host tensors, each layer's step blocks go through a pinned buffer to
    # the device and back; results as with the cache in device memory (CUDA graphs off for both);
    # lookahead moves accepted KV inside the host cache
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (70,), generator=gen).tolist(),
               torch.randint(3, 500, (9,), generator=gen).tolist()]
    common = dict(dtype="float32", device="cuda", kv_cache_memory="16MiB", block_size=16,
                  enforce_eager=True, speculative_config=spec)
    want = _run(LLM(str(tiny_model_dir), **common), prompts)
    llm = LLM(str(tiny_model_dir), kv_offload=True, **common)
    got = _run(llm, prompts)
    runner = llm.llm_engine.executor.runner
    assert all(c.device.type == "cpu" for c in runner.kv_caches)
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want):
        assert tokens == want_tokens
        torch.testing.assert_close(lps, want_lps, atol=1e-5, rtol=0)
