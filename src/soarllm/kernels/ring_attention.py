"""Ring attention: exact causal attention over a sequence split across context-parallel ranks.

Each rank holds the queries, keys and values of its share of the sequence. In ``world_size - 1``
steps every rank passes the key/value block it holds to the next rank of the ring (isend/irecv,
posted before the current block is attended, so the transfer overlaps the compute) and receives
the previous rank's; the partial outputs are merged with the log-sum-exp (online softmax) rule.
No rank ever holds more than its own queries x one rank's keys of scores, never the whole matrix.

The causal mask is computed from positions, not block indices, so any split works: contiguous
slices (a key block from a later rank is fully masked and skipped) or the striped layout the
context-parallel engine uses (token p on rank p % world_size: every rank does the same causal
work; Brandon et al., "Striped Attention", 2023).

Decode with a distributed KV cache is the same merge without the ring (flash-decoding across
ranks): each rank attends the new queries against its own KV shard and the ranks' (output,
log-sum-exp) pairs are all-gathered and merged (``merge_across_ranks``).
"""

from __future__ import annotations

import torch


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, scale: float, sliding_window: int | None = None,
                       softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q [Tq, Hq, D] over k/v [Tk, Hkv, D] (Hq a multiple of Hkv) where a
    query at position ``q_pos[i]`` sees keys at ``k_pos[j] <= q_pos[i]`` (and inside the sliding
    window). Returns (output [Tq, Hq, D] float32, log-sum-exp of the scores [Tq, Hq] float32); a
    query that sees no key gets output 0 and log-sum-exp -inf, which the merge ignores."""
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    # [Hkv, Tq*G, D]: the query heads grouped under the KV head they share
    qg = q.float().view(tq, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, tq * g, d)
    scores = torch.matmul(qg * scale, k.float().permute(1, 2, 0))  # [Hkv, Tq*G, Tk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = k_pos[None, :] <= q_pos[:, None]  # [Tq, Tk]
    if sliding_window is not None:
        visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
    visible = visible[:, None, :].expand(tq, g, tk).reshape(tq * g, tk)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, Tq*G]
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(probs, v.float().transpose(0, 1))  # [Hkv, Tq*G, D]
    out = out.view(hkv, tq, g, d).permute(1, 0, 2, 3).reshape(tq, hq, d)
    return out, lse.view(hkv, tq, g).permute(1, 0, 2).reshape(tq, hq)


def merge_attention_states(outs: list[torch.Tensor], lses: list[torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attention results over disjoint key sets: each output weighted by
    exp(its lse - the total lse). outs [Tq, Hq, D], lses [Tq, Hq]; partials with lse -inf (no
    visible key) weigh 0."""
    lse = torch.stack(lses)  # [N, Tq, Hq]
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - torch.where(torch.isinf(total), 0.0, total))  # 0 where lse is -inf
    out = (torch.stack(outs) * weights[..., None]).sum(dim=0)
    return out, total


def _ranks(group) -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group, rank: int) -> int:
    import torch.distributed as dist

    return rank if group is None else dist.get_global_rank(group, rank)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                   k_pos: torch.Tensor, scale: float, group=None,
                   sliding_window: int | None = None, softcap: float | None = None,
                   ) -> torch.Tensor:
    """Causal attention of this rank's queries q [Tq, Hq, D] over every rank's keys/values.

    k/v [Tk, Hkv, D] and ``k_pos`` are this rank's share; shares may differ in length (one
    all-gather of the lengths sizes the receive buffers). Every rank of ``group`` (None: the
    default group) must call this together. Returns [Tq, Hq, D] in q's dtype.
    """
    rank, world = _ranks(group)
    if world == 1:
        return attention_with_lse(q, k, v, q_pos, k_pos, scale, sliding_window, softcap)[0].to(
            q.dtype)
    import torch.distributed as dist

    lengths = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([k.shape[0]], dtype=torch.long), group=group)
    lengths = [int(n) for n in lengths]
    nxt, prv = _global(group, (rank + 1) % world), _global(group, (rank - 1) % world)
    kv = torch.stack([k, v]).contiguous()  # one message per step for both
    pos = k_pos.to(torch.long).contiguous()
    outs, lses = [], []
    for step in range(world):
        src = (rank - step) % world  # the rank whose block this one holds now
        pending, last = [], step == world - 1
        if not last:  # post the next transfer first: it overlaps this block's compute
            recv_from = (rank - step - 1) % world
            n = lengths[recv_from]
            next_kv = kv.new_empty((2, n, *kv.shape[2:]))
            next_pos = pos.new_empty(n)
            if kv.shape[1]:  # an empty share sends nothing (its receiver knows the length)
                pending += [dist.isend(kv, nxt, group=group), dist.isend(pos, nxt, group=group)]
            if n:
                pending += [dist.irecv(next_kv, prv, group=group),
                            dist.irecv(next_pos, prv, group=group)]
        # a block whose first key comes after this rank's last query is fully masked: skip it
        if lengths[src] and q.shape[0] and int(pos.min()) <= int(q_pos.max()):
            o, lse = attention_with_lse(q, kv[0], kv[1], q_pos, pos, scale, sliding_window,
                                        softcap)
            outs.append(o)
            lses.append(lse)
        for work in pending:
            work.wait()
        if not last:
            kv, pos = next_kv, next_pos
    if not outs:
        return torch.zeros_like(q)
    return merge_attention_states(outs, lses)[0].to(q.dtype)


def merge_across_ranks(out: torch.Tensor, lse: torch.Tensor, group=None) -> torch.Tensor:
    """Flash-decoding across ranks: every rank attended the same queries over its own KV shard;
    all-gather the (output [Tq, Hq, D], lse [Tq, Hq]) pairs and merge them. Every rank gets the
    same result (merged in rank order), so replicated decode rows stay identical."""
    _, world = _ranks(group)
    if world == 1:
        return out
    import torch.distributed as dist

    packed = torch.cat([out.float(), lse.float()[..., None]], dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=group)
    merged, _ = merge_attention_states([p[..., :-1] for p in parts], [p[..., -1] for p in parts])
    return merged
