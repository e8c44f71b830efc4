"""Context parallelism over two processes (gloo on CPU): ring attention and the cross-rank decode
merge against PyTorch's SDPA over the whole sequence; the engine at context_parallel_size=2
against the same engine at 1 (itself tested against transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from soarllm.distributed.multiproc import free_port


def _spawn(fn, *args):
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(free_port(), *args), nprocs=2, join=True)


def _join(rank: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)


def _sdpa_causal(q, k, v, scale, window=None):
    """The oracle: SDPA over the whole sequence, [T, H, D] in and out."""
    t = q.shape[0]
    i = torch.arange(t)
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask = mask & (i[None, :] > i[:, None] - window)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(0, 1)


def _ring_worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    from soarllm.kernels.ring_attention import (
        attention_with_lse,
        merge_across_ranks,
        ring_attention,
    )

    _join(rank, port)
    try:
        gen = torch.Generator().manual_seed(0)
        t, hq, hkv, d = 37, 4, 2, 16  # grouped-query, a length two ranks do not split evenly
        q, k, v = (torch.randn(t, h, d, generator=gen) for h in (hq, hkv, hkv))
        scale = d**-0.5
        pos = torch.arange(t)
        splits = {
            "contiguous": [pos[:21], pos[21:]],  # uneven: 21 + 16
            "striped": [pos[0::2], pos[1::2]],  # token p on rank p % 2: 19 + 18
        }
        for window in (None, 5):
            ref = _sdpa_causal(q, k, v, scale, window)
            for name, parts in splits.items():
                mine = parts[rank]
                out = ring_attention(q[mine], k[mine], v[mine], mine, mine, scale,
                                     sliding_window=window)
                torch.testing.assert_close(out, ref[mine], atol=1e-5, rtol=1e-5,
                                           msg=f"{name}, window {window}")
        # decode: the last 3 queries replicated, the KV split between the ranks (striped)
        shard = pos[rank::2]
        o, lse = attention_with_lse(q[-3:], k[shard], v[shard], pos[-3:], shard, scale)
        out = merge_across_ranks(o, lse)
        torch.testing.assert_close(out, _sdpa_causal(q, k, v, scale)[-3:], atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_ring_attention_equals_sdpa_over_the_whole_sequence():
    """Contiguous (uneven) and striped splits, grouped-query heads, with and without a sliding
    window; and the decode merge of per-rank (output, log-sum-exp) pairs."""
    _spawn(_ring_worker)


# -- the engine: LLM(..., context_parallel_size=2) against the same engine at 1 -------------------

N_TOKENS = 8


def _run(llm, prompt_ids, prompt_logprobs=True):
    """Greedy tokens, their logprobs and (asked for) every prompt position's logprob of the next
    token; a request asking for prompt logprobs skips the prefix cache."""
    from soarllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=1,
                        prompt_logprobs=1 if prompt_logprobs else None)
    outs = llm.generate([list(p) for p in prompt_ids], sp)
    result = []
    for o in outs:
        c = o.outputs[0]
        prompt = [lp[t].logprob for lp, t in zip((o.prompt_logprobs or [])[1:],
                                                   o.prompt_token_ids[1:])]
        sampled = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]
        result.append((c.token_ids, torch.tensor(prompt + sampled, dtype=torch.float64)))
    return result


@pytest.mark.parametrize("tp", [1, 2])
def test_context_parallel_2_equals_1_with_half_the_kv_per_rank(tiny_gqa_dir, tp):
    """A long prompt (chunked: later chunks attend to KV the earlier ones left on both ranks) and
    a short one in the same batch, then one that starts with the long one's prefix (a prefix
    cache hit on both ranks' shards); decodes over the distributed KV. Every prompt position's
    logprob and the greedy continuation match CP=1 (itself tested against transformers); each
    rank's KV cache is half of CP=1's for the same token capacity. With tensor parallel 2 as well
    (four ranks: two split the heads and weights, each pair of the same heads splits the tokens),
    a quarter."""
    from soarllm import LLM

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (150,), generator=gen).tolist(),
               torch.randint(3, 500, (9,), generator=gen).tolist()]
    later = [prompts[0][:100] + torch.randint(3, 500, (20,), generator=gen).tolist()]
    common = dict(dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=64,
                  max_model_len=256)
    one = LLM(str(tiny_gqa_dir), **common)
    ref = _run(one, prompts) + _run(one, later, prompt_logprobs=False)
    ref_bytes = sum(c.numel() * c.element_size() for c in one.llm_engine.executor.runner.kv_caches)
    ref_tokens = one.llm_engine.cache_config.num_blocks * one.llm_engine.cache_config.block_size
    one.llm_engine.shutdown()
    two = LLM(str(tiny_gqa_dir), context_parallel_size=2, tensor_parallel_size=tp, **common)
    try:
        got = _run(two, prompts) + _run(two, later, prompt_logprobs=False)
        assert two.llm_engine.kv.prefix_cache_hits >= 96  # three blocks of 32 tokens
        per_rank = two.llm_engine.executor.collective_rpc("kv_cache_bytes")
        cache = two.llm_engine.cache_config
        assert cache.num_blocks * cache.block_size == ref_tokens  # the same tokens fit ...
        assert per_rank == [ref_bytes // (2 * tp)] * (2 * tp)  # ... in 1 / ranks on each
    finally:
        two.llm_engine.shutdown()
    for (tokens, lps), (ref_tokens_, ref_lps) in zip(got, ref):
        assert tokens == ref_tokens_
        torch.testing.assert_close(lps, ref_lps, atol=1e-4, rtol=0)


def test_context_parallel_refuses_what_it_does_not_combine_with():
    """Refused with a message naming the fix, before any worker starts."""
    import pytest

    from soarllm.config import EngineArgs
    from soarllm.distributed.executor import executor_backend
    from soarllm.errors import ConfigError

    cases = [
        (dict(context_parallel_size=0), "positive integer"),
        (dict(context_parallel_size=2, distributed_executor_backend="uni"), "'mp'"),
        (dict(context_parallel_size=2, speculative_config={"method": "ngram"}),
         "drop speculative_config"),
        (dict(context_parallel_size=2, attention_backend="triton"), "attention_backend"),
    ]
    for kwargs, fix in cases:
        with pytest.raises(ConfigError, match=fix):
            executor_backend(EngineArgs(device="cpu", **kwargs))
    assert executor_backend(EngineArgs(device="cpu", context_parallel_size=2)) == "mp"
