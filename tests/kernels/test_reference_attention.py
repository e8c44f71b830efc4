"""The CPU paged-attention backends (the reference one, and the native kernel of
kernels/cpu_attention.py) against a naive oracle written here: per request, gather its keys/values
position by position from the block table, and softmax(q k^T * scale) v in float64 (with the
softcap, when asked, applied to the scaled scores as tanh(s / cap) * cap).

Covers decodes of mixed context lengths (several gather buckets), bfloat16 (grouped matmul path) and
float32 (SDPA path), sliding windows, and prefill chunks on cached context mixed into the same batch;
and the int8 KV cache, against the same oracle on keys/values quantized here in numpy (symmetric,
one scale per token and head: max |x| / 127).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from soarllm.kernels import kv_quant
from soarllm.kernels.attention import AttentionMetadata, get_attention_backend

HQ, HKV, D, BS = 6, 2, 16, 4


def _oracle(q, keys, values, scale, window, softcap=None):
    """q [Lq, Hq, D]; keys/values [ctx, Hkv, D]; causal over the last Lq positions."""
    ctx, lq = keys.shape[0], q.shape[0]
    out = np.zeros(q.shape)
    g = HQ // HKV
    for i in range(lq):
        pos = ctx - lq + i
        for h in range(HQ):
            ks = keys[: pos + 1, h // g].astype(np.float64)
            vs = values[: pos + 1, h // g].astype(np.float64)
            s = ks @ q[i, h].astype(np.float64) * scale
            if softcap is not None:
                s = np.tanh(s / softcap) * softcap
            if window is not None:
                s[: max(0, pos + 1 - window)] = -np.inf
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ vs
    return out


def _int8_round_trip(x: np.ndarray) -> np.ndarray:
    """What an int8 cache gives back for x [..., D], computed in float32 like the cache does."""
    x = x.astype(np.float32)
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-8)) / np.float32(127)
    return np.clip(np.round(x / scale), -127, 127).astype(np.float32) * scale


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
@pytest.mark.parametrize("kv", ["auto", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 2.0)])
def test_mixed_batch_matches_naive_oracle(dtype, window, softcap, kv, backend_name):
    g = torch.Generator().manual_seed(0)
    # 12 decodes with spread-out context lengths (several buckets), then two prefill chunks.
    ctx_lens = [3, 4, 6, 9, 11, 12, 17, 20, 25, 31, 40, 57]
    chunks = [(7, 0), (5, 13)]  # (new tokens, cached tokens before them)
    reqs = [(1, c - 1) for c in ctx_lens] + chunks
    num_blocks = sum(math.ceil((n + c) / BS) for n, c in reqs) + 3
    int8 = kv == "int8"
    cache = (torch.zeros(2, num_blocks, BS, HKV, D + kv_quant.SCALE_BYTES, dtype=torch.int8)
             if int8 else torch.zeros(2, num_blocks, BS, HKV, D, dtype=dtype))
    store = kv_quant.quantize if int8 else (lambda x: x)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, positions, qsl, seq_lens, new_k, new_v, olds = [], [], [], [0], [], [], [], []
    for n, cached in reqs:
        total = n + cached
        blocks = [perm.pop() for _ in range(math.ceil(total / BS))]
        tables.append(blocks)
        keys = torch.randn(total, HKV, D, generator=g).to(dtype)
        vals = torch.randn(total, HKV, D, generator=g).to(dtype)
        for p in range(cached):  # earlier steps wrote these
            cache[0, blocks[p // BS], p % BS] = store(keys[p])
            cache[1, blocks[p // BS], p % BS] = store(vals[p])
        for p in range(cached, total):
            slots.append(blocks[p // BS] * BS + p % BS)
            positions.append(p)
        new_k.append(keys[cached:])
        new_v.append(vals[cached:])
        olds.append((keys, vals))
        qsl.append(qsl[-1] + n)
        seq_lens.append(total)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    meta = AttentionMetadata(
        positions=torch.tensor(positions), query_start_loc=torch.tensor(qsl),
        seq_lens=torch.tensor(seq_lens), slot_mapping=torch.tensor(slots), block_tables=bt,
        logits_indices=torch.tensor([0]), num_decodes=len(ctx_lens),
        query_lens_cpu=[n for n, _ in reqs], query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
    )
    q = torch.randn(qsl[-1], HQ, D, generator=g).to(dtype)
    scale = D**-0.5
    backend = get_attention_backend("cpu", backend_name)
    for _layer in range(2):  # a second layer reuses the per-step decode plan
        out = backend.forward(q, torch.cat(new_k), torch.cat(new_v), cache, meta, scale, window,
                              softcap)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    seen = _int8_round_trip if int8 else (lambda x: x)
    for i, (keys, vals) in enumerate(olds):
        s, e = qsl[i], qsl[i + 1]
        want = _oracle(q[s:e].float().numpy(), seen(keys.float().numpy()),
                       seen(vals.float().numpy()), scale, window, softcap)
        np.testing.assert_allclose(out[s:e].float().numpy(), want, atol=tol, rtol=tol)
