"""Paged attention over a KV cache split between context-parallel ranks (striped layout).

Token p of every request lives on rank ``p % world_size``, at local index ``p // world_size`` of
that rank's paged cache (same block ids on every rank, ``block_size`` local slots per block), so a
rank stores 1 / world_size of every request's KV. The runner hands each rank:

- prefill rows (chunks): only the rank's own tokens of the chunk (their global positions in
  ``meta.positions``), local slots, and ``seq_lens`` = the global context length. They attend by
  ring attention over every rank's share of the context, cached chunks included (a chunk with
  nothing cached before uses its new keys directly);
- decode rows: replicated on every rank (the whole model runs them on every rank, so they stay
  identical); the new token's KV is stored by its owner rank only (slot -1 elsewhere). Each rank
  attends them over its own shard and the (output, log-sum-exp) pairs are merged across ranks.
"""

from __future__ import annotations

import torch

from soarllm.kernels.attention import AttentionMetadata, _gather, _readable, write_kv
from soarllm.kernels.ring_attention import attention_with_lse, merge_across_ranks, ring_attention


def local_length(seq_len: int, rank: int, world_size: int) -> int:
    """How many of positions 0 .. seq_len - 1 the striped layout puts on ``rank``."""
    return max(0, (seq_len - rank + world_size - 1) // world_size)


class ContextParallelAttentionBackend:
    """The reference backend's contract, for one rank of a context-parallel group."""

    name = "context_parallel"

    def __init__(self, rank: int, world_size: int, group=None):
        self.rank, self.world_size, self.group = rank, world_size, group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        keep = meta.slot_mapping >= 0  # decode rows other ranks store
        write_kv(k[keep], v[keep], kv_cache, meta.slot_mapping[keep])
        out = torch.empty_like(q)
        nd = meta.num_decodes
        r, w = self.rank, self.world_size
        starts = meta.query_start_loc_cpu
        if nd:
            outs, lses = [], []
            for i in range(nd):
                ctx = meta.seq_lens_cpu[i]
                kk, vv, kpos = self._shard(kv_cache, meta.block_tables[i], ctx, q)
                o, lse = attention_with_lse(q[i : i + 1], kk, vv, meta.positions[i : i + 1], kpos,
                                            scale, sliding_window, softcap)
                outs.append(o)
                lses.append(lse)
            merged = merge_across_ranks(torch.cat(outs), torch.cat(lses), self.group)
            out[:nd] = merged.to(q.dtype)
        for i in range(nd, meta.num_reqs):
            s, e = starts[i], starts[i + 1]
            ctx = meta.seq_lens_cpu[i]
            qpos = meta.positions[s:e]
            if local_length(ctx, r, w) == e - s:  # nothing of this rank's share cached before
                kk, vv, kpos = k[s:e], v[s:e], qpos
            else:
                kk, vv, kpos = self._shard(kv_cache, meta.block_tables[i], ctx, q)
            out[s:e] = ring_attention(q[s:e], kk, vv, qpos, kpos, scale, self.group,
                                      sliding_window, softcap)
        return out

    def _shard(self, kv_cache, block_table, ctx: int, q):
        """This rank's keys / values of positions < ctx, and their global positions."""
        n = local_length(ctx, self.rank, self.world_size)
        kk, vv = _gather(kv_cache, block_table, n)
        kpos = torch.arange(n, device=q.device) * self.world_size + self.rank
        return _readable(kk, q.dtype), _readable(vv, q.dtype), kpos
