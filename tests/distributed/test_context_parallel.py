"""Context parallelism over two processes (gloo on CPU): ring attention and the cross-rank decode
merge against PyTorch's SDPA over the whole sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from soarllm.model.parallel_state import free_port


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
