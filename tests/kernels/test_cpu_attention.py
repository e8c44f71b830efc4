"""The native CPU attention backend (kernels/cpu_attention.py): its decode kernel against the naive
float64 oracle of test_reference_attention.py on shapes the mixed-batch test there does not reach
(speculative verification rows, head size 256, many query heads per KV head, a strided query),
how it is picked and how it falls back, and a tiny model through the engine against transformers.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from soarllm.errors import ConfigError
from soarllm.kernels import cpu_native
from soarllm.kernels.attention import AttentionMetadata, get_attention_backend
from tests.kernels.test_reference_attention import _oracle
from tests.tiny import make_tiny_model


def _decode_batch(lens, hq, hkv, d, bs, dtype, seed=0, group_sizes=None):
    """Decode rows with context lengths ``lens`` over a shuffled paged cache. Rows of one
    verification group share a request: consecutive lengths over the same blocks."""
    g = torch.Generator().manual_seed(seed)
    group_sizes = group_sizes or [1] * len(lens)
    num_blocks = sum(math.ceil(max(lens) / bs) for _ in group_sizes) + 2
    cache = torch.zeros(2, num_blocks, bs, hkv, d, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, contexts, row = [], [], 0
    for size in group_sizes:
        total = lens[row + size - 1]
        blocks = [perm.pop() for _ in range(math.ceil(total / bs))]
        keys = torch.randn(total, hkv, d, generator=g).to(dtype)
        vals = torch.randn(total, hkv, d, generator=g).to(dtype)
        for p in range(total):
            cache[0, blocks[p // bs], p % bs] = keys[p]
            cache[1, blocks[p // bs], p % bs] = vals[p]
        for j in range(size):
            tables.append(blocks)
            contexts.append((keys[: lens[row + j]], vals[: lens[row + j]]))
        row += size
    width = max(len(t) for t in tables)
    n = len(lens)
    slots = [tables[i][(lens[i] - 1) // bs] * bs + (lens[i] - 1) % bs for i in range(n)]
    meta = AttentionMetadata(
        positions=torch.tensor(lens) - 1, query_start_loc=torch.arange(n + 1),
        seq_lens=torch.tensor(lens), slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        logits_indices=torch.arange(n), num_decodes=n, query_lens_cpu=[1] * n,
        query_start_loc_cpu=list(range(n + 1)), seq_lens_cpu=list(lens),
        decode_group_sizes_cpu=None if all(s == 1 for s in group_sizes) else group_sizes,
    )
    new_k = torch.stack([k[-1] for k, _ in contexts])
    new_v = torch.stack([v[-1] for _, v in contexts])
    return cache, meta, new_k, new_v, contexts, g


def _check(out, q, contexts, scale, hq, hkv, tol, window=None):
    import tests.kernels.test_reference_attention as ref

    saved = ref.HQ, ref.HKV
    ref.HQ, ref.HKV = hq, hkv  # the oracle reads the head counts from its module
    try:
        for i, (keys, vals) in enumerate(contexts):
            want = _oracle(q[i : i + 1].float().numpy(), keys.float().numpy(),
                           vals.float().numpy(), scale, window)
            np.testing.assert_allclose(out[i : i + 1].float().numpy(), want, atol=tol, rtol=tol)
    finally:
        ref.HQ, ref.HKV = saved


@pytest.fixture
def cpu_backend():
    return get_attention_backend("cpu", "cpu")


@pytest.mark.parametrize("d", [32, 64, 128])  # 64 and 128: the kernel's specialised head sizes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verification_rows_read_their_own_context_length(cpu_backend, dtype, d):
    # two plain decodes and a verification of 1 + 3 rows (consecutive lengths, the same blocks)
    lens = [5, 33, 18, 19, 20, 21]
    cache, meta, k, v, contexts, g = _decode_batch(lens, 4, 2, d, 8, dtype,
                                                   group_sizes=[1, 1, 4])
    q = torch.randn(len(lens), 4, d, generator=g).to(dtype)
    out = cpu_backend.forward(q, k, v, cache, meta, d**-0.5)
    _check(out, q, contexts, d**-0.5, 4, 2, 1e-4 if dtype == torch.float32 else 3e-2)


def test_head_size_256_and_a_strided_query(cpu_backend):
    # Gemma 3's head size; q a view of a fused qkv projection (rows further apart than hq * d)
    hq, hkv, d = 4, 1, 256
    lens = [1, 7, 70]
    cache, meta, k, v, contexts, g = _decode_batch(lens, hq, hkv, d, 16, torch.float32)
    qkv = torch.randn(len(lens), (hq + 2 * hkv) * d, generator=g)
    q = qkv[:, : hq * d].view(len(lens), hq, d)
    assert not q.is_contiguous()
    out = cpu_backend.forward(q, k, v, cache, meta, 0.0625, sliding_window=20)
    _check(out, q, contexts, 0.0625, hq, hkv, 1e-4, window=20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_stores_strided_new_keys_before_attending(cpu_backend, dtype):
    # the usual step: q, k, v are views of one fused qkv projection and the new tokens' slots are
    # still empty; the kernel stores k and v there, then attends over them
    hq, hkv, d = 4, 2, 64
    lens = [3, 17, 40]
    cache, meta, k, v, contexts, g = _decode_batch(lens, hq, hkv, d, 8, dtype)
    flat = cache.view(2, -1, hkv, d)
    flat[:, meta.slot_mapping] = 0
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    qs, ks, vs = (part.view(len(lens), -1, d) for part in qkv.split([hq * d, hkv * d, hkv * d], 1))
    assert not ks.is_contiguous()
    out = cpu_backend.forward(qs, ks, vs, cache, meta, d**-0.5)
    assert torch.equal(flat[0, meta.slot_mapping], k)
    assert torch.equal(flat[1, meta.slot_mapping], v)
    _check(out, q, contexts, d**-0.5, hq, hkv, 1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens, window", [([300], None), ([700, 5], None), ([700, 65], 200)])
def test_few_rows_with_long_contexts_split_their_keys(cpu_backend, dtype, lens, window):
    # batch-1-like steps (3 KV heads, fewer than the threads want): each head's keys are cut into
    # splits attended apart and merged (flash-decoding); a short row beside a long one leaves some
    # of its splits empty
    hq, hkv, d = 9, 3, 64
    cache, meta, k, v, contexts, g = _decode_batch(lens, hq, hkv, d, 16, dtype)
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    out = cpu_backend.forward(q, k, v, cache, meta, d**-0.5, sliding_window=window)
    _check(out, q, contexts, d**-0.5, hq, hkv, 1e-4 if dtype == torch.float32 else 3e-2,
           window=window)


@pytest.mark.parametrize("hq, hkv, d, window", [(9, 3, 64, None), (32, 8, 128, 24), (14, 2, 64, None)])
def test_many_rows_attend_all_kv_heads_of_a_row_together(cpu_backend, hq, hkv, d, window):
    # rows enough for every thread (batch-32-like steps): the bfloat16 path takes a row's KV heads
    # in one item, each key's heads read side by side; the query heads must still meet their own
    # KV head's keys (SmolLM2's 9 / 3, Llama-3-8B's 32 / 8, Qwen2.5-0.5B's 14 / 2)
    lens = [1 + (37 * i) % 90 for i in range(4 * torch.get_num_threads() + 3)]
    cache, meta, k, v, contexts, g = _decode_batch(lens, hq, hkv, d, 16, torch.bfloat16)
    q = torch.randn(len(lens), hq, d, generator=g).to(torch.bfloat16)
    out = cpu_backend.forward(q, k, v, cache, meta, d**-0.5, sliding_window=window)
    _check(out, q, contexts, d**-0.5, hq, hkv, 3e-2, window=window)


def test_shapes_beyond_the_kernel_fall_back_to_the_reference_path(cpu_backend):
    # 64 query heads on one KV head: more than the kernel's 32 per KV head
    lens = [9, 3]
    cache, meta, k, v, contexts, g = _decode_batch(lens, 64, 1, 8, 4, torch.float32)
    q = torch.randn(len(lens), 64, 8, generator=g)
    out = cpu_backend.forward(q, k, v, cache, meta, 0.5)
    _check(out, q, contexts, 0.5, 64, 1, 1e-4)


def test_auto_picks_the_native_kernel_on_cpu_and_falls_back_without_it(monkeypatch, caplog):
    assert get_attention_backend("cpu").name == "cpu"
    monkeypatch.setenv("SOARLLM_NATIVE_KERNELS", "0")
    cpu_native.load.cache_clear()
    try:
        assert get_attention_backend("cpu").name == "reference"
        with pytest.raises(ConfigError, match="attention_backend='reference'"):
            get_attention_backend("cpu", "cpu")
    finally:
        cpu_native.load.cache_clear()
    with pytest.raises(ConfigError, match="runs on the CPU"):
        get_attention_backend("cuda", "cpu")


def test_a_failed_build_warns_once_and_leaves_the_pytorch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SOARLLM_HOME", str(tmp_path / "home"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "paged_attention.c").write_text("this is not C\n")
    monkeypatch.setattr(cpu_native, "SOURCES", tmp_path / "src")
    cpu_native.load.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="failed to build paged_attention.c"):
            cpu_native.build("paged_attention")
        with caplog.at_level(logging.WARNING, logger="soarllm.kernels.cpu_native"):
            assert cpu_native.load("paged_attention") is None
        assert "using the PyTorch path" in caplog.text
        assert get_attention_backend("cpu").name == "reference"
        # nothing half-written is left to be loaded by the next start
        assert not [p for p in (tmp_path / "home").rglob("*.so")]
    finally:
        cpu_native.load.cache_clear()


def test_a_built_library_is_reused_without_compiling(monkeypatch, tmp_path):
    monkeypatch.setenv("SOARLLM_HOME", str(tmp_path))
    first = cpu_native.build("paged_attention")
    calls = []
    real_run = cpu_native.subprocess.run

    def run(cmd, *args, **kwargs):
        calls.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(cpu_native.subprocess, "run", run)
    assert cpu_native.build("paged_attention") == first
    assert all("-o" not in cmd for cmd in calls)  # only `cc --version`, no build


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_with_the_native_kernel_matches_the_reference_backend(tiny_llama_dir, dtype):
    """Greedy tokens through the whole engine (chunked prefill over cached prefixes, decodes of
    mixed lengths in one batch): the native kernel against the reference backend, and in float32
    against transformers' generate."""
    from transformers import AutoModelForCausalLM

    from soarllm import LLM, SamplingParams

    prompts = [[5 + (i * 7 + j) % 200 for j in range(n)] for i, n in enumerate([3, 40, 17, 61])]
    prompts.append(prompts[1][:30] + [9, 8, 7])  # a prefix hit
    params = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=24)
    outs = {}
    for name in ("reference", "cpu"):
        llm = LLM(str(tiny_llama_dir), dtype=dtype, attention_backend=name, block_size=4,
                  max_num_batched_tokens=32, enable_prefix_caching=True, enforce_eager=True,
                  kv_cache_memory="32MiB")
        assert llm.llm_engine.executor.runner.backend.name == name
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["cpu"] == outs["reference"]
    if dtype == "float32":
        hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
        with torch.inference_mode():
            for ids, got in zip(prompts, outs["cpu"]):
                want = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                                   min_new_tokens=24, attention_mask=torch.ones(1, len(ids),
                                                                                dtype=torch.long))
                assert got == want[0, len(ids):].tolist()
