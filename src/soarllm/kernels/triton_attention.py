"""The Triton paged-attention backend (GPU; on CPU only under TRITON_INTERPRET=1, for tests).

Same contract as ReferenceAttentionBackend.forward: write the new keys/values into the paged cache,
then attend; given ``rope`` (cos, sin), q and k are first rotated in place by the kernel that
stores k and v (kernels/triton/rotary.py), saving a launch per layer. The first ``meta.num_decodes`` rows (one query token each: decodes and the rows of a
speculative verification) go through the split-K decode kernel, which reads only the device tensors
meta.seq_lens / meta.block_tables (graph-capturable); the remaining rows (prefill chunks, prompts,
rows with a custom mask) through the varlen prefill kernel, planned once per step from the CPU
lists and reused by every layer. int8 KV caches are read and written by the kernels themselves.
"""

from __future__ import annotations

import torch

from soarllm.kernels.attention import AttentionMetadata
from soarllm.kernels.triton import paged_attention as pa


class TritonAttentionBackend:
    name = "triton"
    # the decode path reads only device tensors and launches shape-determined grids
    supports_cuda_graphs = True
    # forward(..., rope=(cos, sin)) rotates q and k in the KV-cache write kernel
    fuses_rope = True

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if rope is not None:  # q, k rotated in place while k, v are stored (float caches only)
            from soarllm.kernels.triton.rotary import rotary_embedding_and_cache_write

            rotary_embedding_and_cache_write(q, k, v, *rope, kv_cache, meta.slot_mapping)
        else:
            pa.write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            pa.decode_attention(q[:nd], kv_cache, meta.seq_lens[:nd], meta.block_tables[:nd],
                                scale, sliding_window, softcap, out=out[:nd])
        if meta.num_reqs > nd:
            bt_rows, q_starts, q_lens, ctx_lens, max_q, offsets, masks = _prefill_plan(
                meta, nd, q.device)
            pa.prefill_attention(q, kv_cache, meta.block_tables, bt_rows, q_starts, q_lens,
                                 ctx_lens, max_q, scale, sliding_window, softcap,
                                 mask_offsets=offsets, masks=masks, out=out)
        return out


def _prefill_plan(meta: AttentionMetadata, nd: int, device: torch.device):
    """Per step, not per layer: (block-table rows, query starts, query lengths, context lengths,
    longest query, mask offsets, packed masks) of the rows after the decodes."""
    plan = meta.cache.get("triton_prefill")
    if plan is None:
        rows = list(range(nd, meta.num_reqs))
        starts = [meta.query_start_loc_cpu[i] for i in rows]
        qlens = [meta.query_start_loc_cpu[i + 1] - meta.query_start_loc_cpu[i] for i in rows]
        ctx = [meta.seq_lens_cpu[i] for i in rows]
        table = torch.tensor([rows, starts, qlens, ctx], dtype=torch.int64).to(device)
        offsets = masks = None
        customs = meta.custom_masks
        if customs is not None and any(customs[i] is not None for i in rows):
            masks, offs = pa.pack_custom_masks([customs[i] for i in rows], device)
            offsets = torch.tensor(offs, dtype=torch.int64).to(device)
        plan = (table[0], table[1], table[2], table[3], max(qlens), offsets, masks)
        meta.cache["triton_prefill"] = plan
    return plan
