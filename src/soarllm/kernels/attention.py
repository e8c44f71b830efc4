"""Paged attention: attention metadata and the reference PyTorch backend.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]. A token at
position p of a request lives in slot ``block_table[p // block_size] * block_size + p % block_size``.
A latent cache (MLA, model/models/deepseek.py) has one plane instead of two, [1, num_blocks, ...]:
each token's single vector is both its key and its value, stored once.

The reference backend runs on every device and is the oracle for fast backends. It handles any mix of
requests in one flat batch: single-token decodes go through one padded, batched SDPA call; requests with
several query tokens (prefill chunks, speculative verification) go one by one, with a causal mask offset
by their cached context, an optional per-request custom mask, and an optional sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from soarllm.kernels import kv_quant


@dataclass
class AttentionMetadata:
    """Everything attention needs about the flat batch; built by the model runner per step.

    Requests with one query token (decodes) come first in the batch, ``num_decodes`` of them.
    """

    positions: torch.Tensor  # [T] position of every new token
    query_start_loc: torch.Tensor  # [B+1] offsets of each request's tokens in the flat batch
    seq_lens: torch.Tensor  # [B] context length including the new tokens
    slot_mapping: torch.Tensor  # [T] KV slot each new token is written to
    block_tables: torch.Tensor  # [B, max_blocks]
    logits_indices: torch.Tensor  # [L] positions in the flat batch whose logits are needed
    num_decodes: int
    query_lens_cpu: list[int]
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Optional per-request masks [q_len, seq_len] (True = may attend), for tree/lookahead verification.
    custom_masks: list[torch.Tensor | None] | None = None
    # Decode rows that belong to one request (a speculative verification: 1 + k rows at consecutive
    # lengths), as the sizes of consecutive runs of the first num_decodes rows; None: all 1. A run
    # reads its request's KV once for all its rows.
    decode_group_sizes_cpu: list[int] | None = None
    # Per-step values a backend derives once and reuses in every layer (e.g. the decode plan).
    cache: dict = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """Store new keys/values [T, H_kv, D] into their slots of the paged cache (quantized first when
    the cache is int8, see kernels/kv_quant.py)."""
    planes, num_blocks, block_size, h, d = kv_cache.shape
    flat = kv_cache.view(planes, num_blocks * block_size, h, d)
    if kv_quant.is_quantized(kv_cache):
        k = kv_quant.quantize(k)
        v = kv_quant.quantize(v) if planes == 2 else None
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    if planes == 2:  # a latent cache (one plane) reads its keys as the values
        flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def _readable(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gathered cache entries as attention reads them: dequantized from an int8 cache."""
    return kv_quant.dequantize(x, dtype) if kv_quant.is_quantized(x) else x


def _gather(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int):
    """Keys and values of the first ``length`` positions: [length, H_kv, D] for one block table
    [max_blocks], or [B, length, H_kv, D] for a batch of them [B, max_blocks].

    index_select on the flattened block dimension copies only the blocks asked for (advanced
    indexing of the cache would touch the whole tensor).
    """
    planes, num_blocks, block_size, h, d = kv_cache.shape
    n = (length + block_size - 1) // block_size
    ids = block_table[..., :n]
    flat = kv_cache.view(planes, num_blocks, block_size * h * d)
    shape = ids.shape[:-1] + (n * block_size, h, d)
    k = flat[0].index_select(0, ids.reshape(-1)).view(shape)
    v = flat[1].index_select(0, ids.reshape(-1)).view(shape) if planes == 2 else k
    return k[..., :length, :, :], v[..., :length, :, :]


def _sdpa(q, k, v, mask, scale, softcap, enable_gqa):
    """q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], mask bool [B or 1, 1, Lq, Lk] or None."""
    # PyTorch's CPU flash kernel falls off its fast path on strided views (5.6 ms instead of
    # 14 us for one decode token): hand it contiguous tensors.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa
        )
    if enable_gqa:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


# Up to this many one-token decodes in a gather bucket go through float32 SDPA, more through the
# grouped bfloat16 matmuls of _decode_attention (measured on a 2-core AVX-512 CPU, head size 64:
# SDPA 60 vs 145 us for one decode at 200 tokens of context, 460 vs 530 us for 8; 4.2 vs 2.9 ms
# for 32).
SDPA_MAX_DECODES = 8


class ReferenceAttentionBackend:
    """Plain PyTorch paged attention; correct on every device."""

    name = "reference"

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
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        hq, hkv = q.shape[1], k.shape[1]
        gqa = hq != hkv
        nd = meta.num_decodes
        if nd == q.shape[0]:  # every row a decode (the usual step): no output buffer to fill
            return self._decode(q, kv_cache, meta, nd, scale, sliding_window, softcap, gqa, None)
        out = torch.empty_like(q)
        if nd:
            self._decode(q[:nd], kv_cache, meta, nd, scale, sliding_window, softcap, gqa, out)
        starts = meta.query_start_loc_cpu
        for i in range(nd, meta.num_reqs):
            s, e = starts[i], starts[i + 1]
            qlen, ctx = e - s, meta.seq_lens_cpu[i]
            custom = meta.custom_masks[i] if meta.custom_masks is not None else None
            if ctx == qlen and custom is None and not kv_quant.is_quantized(kv_cache):
                kk, vv = k[s:e], v[s:e]  # nothing cached before: use the new keys directly
            else:
                kk, vv = _gather(kv_cache, meta.block_tables[i], ctx)
                kk, vv = _readable(kk, q.dtype), _readable(vv, q.dtype)
            mask = custom
            if mask is None:
                qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
                kpos = torch.arange(ctx, device=q.device)[None, :]
                mask = kpos <= qpos
                if sliding_window is not None:
                    mask = mask & (kpos > qpos - sliding_window)
            o = _sdpa(
                q[s:e].transpose(0, 1)[None],
                kk.to(q.dtype).transpose(0, 1)[None],
                vv.to(q.dtype).transpose(0, 1)[None],
                mask[None, None],
                scale,
                softcap,
                gqa,
            )
            out[s:e] = o[0].transpose(0, 1)
        return out

    @staticmethod
    def _decode(q, kv_cache, meta, nd, scale, sliding_window, softcap, gqa, out):
        """Attention of the first ``nd`` rows (one-token decodes and verification rows), written
        into ``out``; with ``out`` None, returned as a new [nd, Hq, D] tensor."""
        planes, num_blocks, block_size, h, d = kv_cache.shape
        flat = kv_cache.view(planes, num_blocks, block_size * h * d)
        plan = _decode_plan(meta, nd, block_size, sliding_window)
        if out is None and not (len(plan) == 1 and plan[0].in_order):
            out = torch.empty_like(q)
        for entry in plan:
            ids, length, rows = entry.block_ids, entry.length, entry.rows
            shape = (ids.shape[0], ids.shape[1] * block_size, h, d)
            kk = _readable(flat[0].index_select(0, ids.reshape(-1)).view(shape)[:, :length], q.dtype)
            vv = (_readable(flat[1].index_select(0, ids.reshape(-1)).view(shape)[:, :length], q.dtype)
                  if planes == 2 else kk)
            # [groups, rows per group, Hq, D]; rows 0..nd-1 in order need no gather
            qq = q[:nd].view(rows.shape[0], rows.shape[1], *q.shape[1:]) if entry.in_order else q[rows]
            small = qq.shape[1] == 1 and qq.shape[0] <= SDPA_MAX_DECODES
            if q.dtype == torch.float32 or softcap is not None or small:
                # PyTorch's float32 SDPA: the fastest for a few decodes; lower-precision caches are
                # widened first (the gathered copy is small), in one copy each
                def heads_first(x):
                    return x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)

                mask = None if entry.full else entry.valid[:, None]
                o = _sdpa(heads_first(qq), heads_first(kk), heads_first(vv), mask, scale, softcap,
                          gqa).transpose(1, 2).to(q.dtype)
            else:
                o = _decode_attention(qq, kk, vv, entry.valid, scale)
            if out is None:  # one bucket, rows in order: the result is the output
                return o.reshape(nd, *o.shape[2:])
            # padding slots repeat their group's last row: writing it twice writes the same value
            out[rows.reshape(-1)] = o.reshape(-1, *o.shape[2:])
        return out


@dataclass
class _DecodeBucket:
    block_ids: torch.Tensor  # [G, n] blocks of each group's request
    length: int  # keys gathered per group (the bucket's longest context)
    valid: torch.Tensor  # [G, M, length] bool: which keys each query row sees
    rows: torch.Tensor  # [G, M] query rows of each group
    in_order: bool  # rows are 0 .. nd-1 in order, one per group (plain decodes)
    full: bool  # every row sees every gathered key (no mask needed)


def _decode_plan(meta: AttentionMetadata, nd: int, block_size: int, sliding_window: int | None):
    """Per step, not per layer: the decode buckets, each (block ids [G, n], padded length, key mask
    [G, M, length], query rows [G, M]) for G groups of up to M rows.

    A group is one request's decode rows (one row, or 1 + k for a verification), so its KV is
    gathered once. The runner sorts decodes by context length; gathering the groups in a few
    buckets, each padded to its own longest context, keeps the copied KV close to what is attended.
    """
    key = ("decode_plan", sliding_window)
    plan = meta.cache.get(key)
    if plan is None:
        sizes = meta.decode_group_sizes_cpu or [1] * nd
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        # rows of a group have consecutive lengths: the last one is the longest
        group_len = [meta.seq_lens_cpu[starts[g + 1] - 1] for g in range(len(sizes))]
        dev = meta.seq_lens.device
        plan = []
        # plain decodes and verifications in separate buckets: a bucket pads every group to its
        # largest, and one verification must not make every decode beside it do k + 1 rows' work
        for kind in (1, 2):
            groups = [g for g in range(len(sizes)) if (sizes[g] > 1) == (kind == 2)]
            for lo, hi in _buckets([group_len[g] for g in groups]):
                members = groups[lo:hi]
                length = max(group_len[g] for g in members)
                n = (length + block_size - 1) // block_size
                m = max(sizes[g] for g in members)
                rows = torch.tensor([[starts[g] + min(j, sizes[g] - 1) for j in range(m)]
                                     for g in members], dtype=torch.long, device=dev)
                lens = meta.seq_lens[rows]  # [G, M]
                kpos = torch.arange(length, device=dev)
                valid = kpos < lens[..., None]
                if sliding_window is not None:
                    valid = valid & (kpos >= lens[..., None] - sliding_window)
                in_order = m == 1 and len(plan) == 0 and members == list(range(len(sizes)))
                full = sliding_window is None and all(
                    meta.seq_lens_cpu[starts[g]] == length for g in members) and m == 1
                plan.append(_DecodeBucket(meta.block_tables[rows[:, 0], :n].contiguous(), length,
                                          valid, rows, in_order and len(sizes) == nd, full))
        meta.cache[key] = plan
    return plan


def _decode_attention(q, k, v, valid, scale):
    """A few query tokens per request (decode: 1; verification: 1 + k), grouped-query aware, as
    three small batched matmuls: each KV head serves its query heads of every row at once.

    q [b, M, Hq, D], k/v [b, L, Hkv, D], valid [b, M, L] -> [b, M, Hq, D]. PyTorch's CPU flash
    kernel is several times slower than this for a single bfloat16 query token.
    """
    b, m, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    length = k.shape[1]
    # query heads grouped by the KV head they share; scaled first so float16 scores cannot overflow
    qg = (q.view(b, m, hkv, g, d) * scale).permute(0, 2, 1, 3, 4).reshape(b, hkv, m * g, d)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float()  # [b, Hkv, M*G, L]
    mask = valid[:, None, :, None, :].expand(b, hkv, m, g, length).reshape(b, hkv, m * g, length)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    o = torch.matmul(probs, v.transpose(1, 2))  # [b, Hkv, M*G, D]
    return o.view(b, hkv, m, g, d).permute(0, 2, 1, 3, 4).reshape(b, m, hq, d)


def _buckets(lens: list[int], max_buckets: int = 4, min_size: int = 8) -> list[tuple[int, int]]:
    """Split sorted lengths into up to ``max_buckets`` contiguous groups of similar length."""
    n = len(lens)
    if n == 0:
        return []
    k = max(1, min(max_buckets, n // min_size))
    if k == 1 or lens[0] * 1.25 >= lens[-1]:
        return [(0, n)]
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def _cpu_kernel():
    from soarllm.kernels.cpu_attention import load_kernel

    return load_kernel()


ATTENTION_BACKENDS = ("auto", "reference", "triton", "cpu")


def get_attention_backend(device: str, name: str | None = None):
    """The attention backend for ``device``: ``name`` None or "auto" picks Triton on CUDA where
    triton is installed, the native CPU kernel (kernels/cpu_attention.py) on CPU where a C compiler
    builds it, else the reference backend (the oracle, every device); "reference", "triton" and
    "cpu" ask for one (Triton on CPU only under TRITON_INTERPRET=1, for tests)."""
    from soarllm.errors import ConfigError
    from soarllm.kernels.triton_utils import interpreter_enabled, triton_available

    choice = (name or "auto").strip().lower()
    if choice not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend={name!r} is not known; use one of "
                          f"{', '.join(ATTENTION_BACKENDS)}")
    on_cuda = str(device).startswith("cuda")
    kernel = None
    if choice == "auto":
        if on_cuda:
            choice = "triton" if triton_available() else "reference"
        else:
            kernel = _cpu_kernel() if str(device) == "cpu" else None
            choice = "cpu" if kernel is not None else "reference"
    if choice == "reference":
        return ReferenceAttentionBackend()
    if choice == "cpu":
        if str(device) != "cpu":
            raise ConfigError(f"attention_backend='cpu' runs on the CPU, not {device!r}: use "
                              "'auto' or 'reference' there")
        kernel = kernel or _cpu_kernel()
        if kernel is None:
            raise ConfigError("attention_backend='cpu' needs its native kernel, which could not be "
                              "built here (a C compiler: cc/gcc/clang, or set CC; see the warning "
                              "above); use attention_backend='reference'")
        from soarllm.kernels.cpu_attention import CpuAttentionBackend

        return CpuAttentionBackend(kernel)
    if not triton_available():
        raise ConfigError("attention_backend='triton' needs the triton package: install it "
                          "(pip install triton) or use attention_backend='reference'")
    if not on_cuda and not interpreter_enabled():
        raise ConfigError(f"attention_backend='triton' runs on CUDA devices, not {device!r}: use "
                          "'reference' or 'auto' there (or set TRITON_INTERPRET=1 to run the "
                          "kernels in Triton's slow interpreter, for tests)")
    from soarllm.kernels.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend()
