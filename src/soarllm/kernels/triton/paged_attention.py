"""Paged attention in Triton: the KV-cache write, split-K decode (flash-decoding) and varlen prefill.

The layer cache is [2, num_blocks, block_size, H_kv, D] (D + 4 int8 bytes per token-head for an
int8 cache: the values, then the float32 scale's bytes, see kernels/kv_quant.py). Every kernel
reads keys and values in place through the block table, one token's block looked up per key row,
so no gathered copy of the context is ever made.

- ``write_kv_cache``: one program per (token, KV head); slot < 0 (CUDA-graph padding) is skipped.
- ``decode_attention``: one query token per row. Grid (rows, KV heads, splits): a program serves
  every query head of its KV head's group at once (the group's heads are the rows of one
  ``tl.dot``, padded to 16) over its share of the context, and writes a partial output and its
  log-sum-exp; a second kernel combines the splits. The split count depends on shapes only and the
  lengths are read on the device, so the launch can be captured in a CUDA graph.
- ``prefill_attention``: several query tokens per request (prefill chunks, the whole prompt, tree
  verification). Grid (query tiles, requests, query heads); query i of a request of ``qlen`` new
  tokens and ``ctx`` tokens of context sits at position ctx - qlen + i. A per-request custom mask
  (True = may attend) replaces the causal and sliding-window masks, as in the reference backend.

Scores and the softmax are float32; probabilities are cast to the value dtype for the second
product, as the reference backend does. float32 inputs use IEEE products (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soarllm.kernels import kv_quant

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp(_NEG - _NEG) is 1, not NaN


@triton.jit
def _tanh(x):
    # tanh from exp (no libdevice: the interpreter and the compiler agree on exp), without overflow
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


# --------------------------------------------------------------------------------------------
# KV-cache write


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    stride_sb, stride_ss, stride_sh,
    block_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    store = d_mask & (slot >= 0)
    safe = tl.maximum(slot, 0)
    blk = safe // block_size
    off = safe % block_size
    dst = blk * stride_cb + off * stride_cs + h * stride_ch
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + offs_d, mask=d_mask, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + offs_d, mask=d_mask, other=0.0)
    if QUANT:
        sdst = blk * stride_sb + off * stride_ss + h * stride_sh + HEAD_DIM // 4
        kf = k.to(tl.float32)
        vf = v.to(tl.float32)
        # IEEE divisions (div_rn), like kv_quant.quantize in PyTorch
        k_scale = tl.div_rn(tl.maximum(tl.max(tl.abs(kf), axis=0), 1e-8), 127.0)
        v_scale = tl.div_rn(tl.maximum(tl.max(tl.abs(vf), axis=0), 1e-8), 127.0)
        kq = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(kf, k_scale)), -127.0), 127.0)
        vq = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(vf, v_scale)), -127.0), 127.0)
        tl.store(kc_ptr + dst + offs_d, kq.to(tl.int8), mask=store)
        tl.store(vc_ptr + dst + offs_d, vq.to(tl.int8), mask=store)
        tl.store(ks_ptr + sdst, k_scale, mask=slot >= 0)
        tl.store(vs_ptr + sdst, v_scale, mask=slot >= 0)
    else:
        tl.store(kc_ptr + dst + offs_d, k.to(kc_ptr.dtype.element_ty), mask=store)
        tl.store(vc_ptr + dst + offs_d, v.to(vc_ptr.dtype.element_ty), mask=store)


def _cache_views(kv_cache: torch.Tensor):
    """(key cache, value cache, key scales, value scales, head dim) of a layer cache; the scale
    views are float32 views of the int8 rows (the scale of a row at index D // 4), or the caches
    themselves when the cache is not quantized."""
    kc, vc = kv_cache[0], kv_cache[1]
    if kv_quant.is_quantized(kv_cache):
        assert kv_cache.shape[-1] % 4 == 0, "int8 KV rows of D + 4 bytes need D % 4 == 0"
        f32 = kv_cache.view(torch.float32)
        return kc, vc, f32[0], f32[1], kv_cache.shape[-1] - kv_quant.SCALE_BYTES
    return kc, vc, kc, vc, kv_cache.shape[-1]


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store k/v [T, H_kv, D] in their slots of ``kv_cache`` (quantized when it is int8); tokens
    whose slot is negative (padding rows of a CUDA graph) are skipped."""
    t, h = k.shape[0], k.shape[1]
    if t == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    kc, vc, ks, vs, d = _cache_views(kv_cache)
    assert kv_cache.stride(-1) == 1 and k.shape[-1] == d
    _write_kv_kernel[(t, h)](
        k, v, kc, vc, ks, vs, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2),
        kv_cache.shape[2],
        HEAD_DIM=d, BLOCK_D=_block_d(d), QUANT=kv_quant.is_quantized(kv_cache),
    )


# --------------------------------------------------------------------------------------------
# shared: one tile of keys or values read in place through the block table


@triton.jit
def _load_kv_tile(c_ptr, s_ptr, bt_row_ptr, offs_n, n_mask, offs_d, d_mask, kvh, block_size,
                  stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                  HEAD_DIM: tl.constexpr, QUANT: tl.constexpr, OUT_DTYPE: tl.constexpr):
    blk = tl.load(bt_row_ptr + offs_n // block_size, mask=n_mask, other=0).to(tl.int64)
    off = (offs_n % block_size).to(tl.int64)
    row = blk * stride_cb + off * stride_cs + kvh * stride_ch
    x = tl.load(c_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                other=0)
    if QUANT:
        srow = blk * stride_sb + off * stride_ss + kvh * stride_sh + HEAD_DIM // 4
        sc = tl.load(s_ptr + srow, mask=n_mask, other=0.0)
        tile = (x.to(tl.float32) * sc[:, None]).to(OUT_DTYPE)
    else:
        tile = x.to(OUT_DTYPE)
    return tile


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # IEEE: float32 inputs multiplied in float32 (no TF32)
    if IEEE:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _scores(q, k, scale, softcap, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    s = _dot(q, tl.trans(k), IEEE) * scale
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    return s


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One key tile of flash attention: fold scores s [rows, n] (masked ones -inf) and their
    values v [n, D] into the running maximum m_i, normaliser l_i and output acc."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


# --------------------------------------------------------------------------------------------
# decode: split-K over the context, GQA group as the rows of the products


@triton.jit
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, seq_lens_ptr,
    out_ptr, part_ptr, lse_ptr,
    scale, softcap, window,
    stride_qt, stride_qh,
    stride_cb, stride_cs, stride_ch,
    stride_sb, stride_ss, stride_sh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    block_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, QUANT: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row).to(tl.int32)
    lo = seq_len * 0
    if WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    bt_row = bt_ptr + row.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_G], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_j
        n_mask = offs_n < end
        k = _load_kv_tile(kc_ptr, ks_ptr, bt_row, offs_n, n_mask, offs_d, d_mask, kvh, block_size,
                          stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                          HEAD_DIM, QUANT, q_ptr.dtype.element_ty)
        s = _scores(q, k, scale, softcap, SOFTCAP, IEEE)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        v = _load_kv_tile(vc_ptr, vs_ptr, bt_row, offs_n, n_mask, offs_d, d_mask, kvh, block_size,
                          stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                          HEAD_DIM, QUANT, q_ptr.dtype.element_ty)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE)

    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    st_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=st_mask)
    else:
        lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), _NEG)
        tl.store(part_ptr + row * stride_pt + heads[:, None] * stride_ph + split * stride_ps
                 + offs_d[None, :], o, mask=st_mask)
        tl.store(lse_ptr + row * stride_lt + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _combine_splits_kernel(
    out_ptr, part_ptr, lse_ptr,
    stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(lse_ptr + row * stride_lt + h * stride_lh + offs_s)
    w = tl.exp(lse - tl.max(lse, axis=0))
    part = tl.load(part_ptr + row * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps
                   + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    o = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=d_mask)


# Splits are chosen so that rows x KV heads x splits fills about two waves of this many programs
# (an H100 has 132 SMs), with at least this many context tokens per split.
_TARGET_PROGRAMS = 264
_MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 16


def num_decode_splits(num_rows: int, num_kv_heads: int, max_context: int) -> int:
    """Split count from static shapes only (graph-capturable): a power of two in [1, MAX_SPLITS]."""
    want = min(triton.cdiv(_TARGET_PROGRAMS, max(1, num_rows * num_kv_heads)),
               max(1, max_context // _MIN_TOKENS_PER_SPLIT), MAX_SPLITS)
    splits = 1
    while splits * 2 <= want:
        splits *= 2
    return splits


def _ieee_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs dimensions of at least 16


def _tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(query rows per prefill tile, keys per tile, pipeline stages) for one head size and dtype:
    the key and value tiles of every stage stay within ~96 KiB of shared memory (an H100 has 227),
    for head sizes up to 256 in float32."""
    row = _block_d(head_dim) * torch.finfo(dtype).bits // 8  # bytes of one key row
    if row <= 256:  # bfloat16/float16 up to D = 128, float32 up to 64
        return 64, 64, 3
    if row <= 512:
        return 32, 32, 2
    return 32, 16, 2


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, sliding_window: int | None = None,
                     softcap: float | None = None, out: torch.Tensor | None = None,
                     num_splits: int | None = None) -> torch.Tensor:
    """One query token per row: q [B, Hq, D] over its row's context of ``seq_lens[b]`` tokens
    (this token included), read through ``block_tables[b]``. Rows of length 0 give zeros.

    Reads only device tensors, launches a fixed grid for given shapes and makes no host sync: it
    can be captured in a CUDA graph (``block_tables.shape[1]`` sets the split count: keep it fixed
    across replays)."""
    b, hq, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    if b == 0:
        return out
    q = _last_dim_contiguous(q)
    kc, vc, ks, vs, hd = _cache_views(kv_cache)
    hkv, block_size = kv_cache.shape[3], kv_cache.shape[2]
    assert hd == d and hq % hkv == 0 and out.stride(-1) == 1 and block_tables.stride(-1) == 1
    group = hq // hkv
    _, block_n, stages = _tiles(d, q.dtype)
    if num_splits is None:
        num_splits = num_decode_splits(b, hkv, block_tables.shape[1] * block_size)
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, "num_splits: a power of two"
    if num_splits > 1:
        part = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused
    block_d = _block_d(d)
    _decode_kernel[(b, hkv, num_splits)](
        q, kc, vc, ks, vs, block_tables, seq_lens,
        out, part, lse,
        scale, softcap if softcap else 1.0, sliding_window or 0,
        q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        part.stride(0), part.stride(1), part.stride(2) if num_splits > 1 else 0,
        lse.stride(0), lse.stride(1),
        block_size,
        GROUP=group, HEAD_DIM=d, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, QUANT=kv_quant.is_quantized(kv_cache),
        SOFTCAP=bool(softcap), WINDOW=sliding_window is not None, IEEE=_ieee_dot(q.dtype),
        num_stages=stages,
    )
    if num_splits > 1:
        _combine_splits_kernel[(b, hq)](
            out, part, lse,
            out.stride(0), out.stride(1), part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, NUM_SPLITS=num_splits,
        )
    return out


# --------------------------------------------------------------------------------------------
# prefill / extend: varlen over the flat batch


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr, bt_ptr,
    bt_rows_ptr, q_starts_ptr, q_lens_ptr, ctx_lens_ptr, mask_offs_ptr, masks_ptr,
    scale, softcap, window,
    stride_qt, stride_qh,
    stride_cb, stride_cs, stride_ch,
    stride_sb, stride_ss, stride_sh,
    stride_bt,
    stride_ot, stride_oh,
    block_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, QUANT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASKS: tl.constexpr, IEEE: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    r = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    qlen = tl.load(q_lens_ptr + r).to(tl.int32)
    ctx = tl.load(ctx_lens_ptr + r).to(tl.int32)
    q0 = tl.load(q_starts_ptr + r).to(tl.int64)
    bt_row = bt_ptr + tl.load(bt_rows_ptr + r).to(tl.int64) * stride_bt

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_N)
    m_mask = offs_m < qlen
    d_mask = offs_d < HEAD_DIM
    qpos = ctx - qlen + offs_m
    q = tl.load(q_ptr + (q0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    # keys this tile of queries may see: causal up to its last query, window back from its first
    hi = tl.minimum(ctx - qlen + m0 + BLOCK_M, ctx)
    lo = hi * 0
    if WINDOW:
        lo = tl.maximum(ctx - qlen + m0 - window + 1, 0)
    if HAS_MASKS:
        mask_off = tl.load(mask_offs_ptr + r)
        has_mask = mask_off >= 0
        lo = tl.where(has_mask, 0, lo)
        hi = tl.where(has_mask, ctx, hi)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.where(m0 < qlen, hi, lo)

    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_j
        n_mask = offs_n < hi
        k = _load_kv_tile(kc_ptr, ks_ptr, bt_row, offs_n, n_mask, offs_d, d_mask, kvh, block_size,
                          stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                          HEAD_DIM, QUANT, q_ptr.dtype.element_ty)
        s = _scores(q, k, scale, softcap, SOFTCAP, IEEE)
        allowed = n_mask[None, :] & (offs_n[None, :] <= qpos[:, None])
        if WINDOW:
            allowed = allowed & (offs_n[None, :] > qpos[:, None] - window)
        if HAS_MASKS:
            custom = tl.load(masks_ptr + mask_off + offs_m[:, None] * ctx + offs_n[None, :],
                             mask=m_mask[:, None] & n_mask[None, :] & has_mask, other=0)
            allowed = tl.where(has_mask, (custom != 0) & n_mask[None, :], allowed)
        s = tl.where(allowed, s, float("-inf"))
        v = _load_kv_tile(vc_ptr, vs_ptr, bt_row, offs_n, n_mask, offs_d, d_mask, kvh, block_size,
                          stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh,
                          HEAD_DIM, QUANT, q_ptr.dtype.element_ty)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def pack_custom_masks(masks: list[torch.Tensor | None], device) -> tuple[torch.Tensor, list[int]]:
    """One flat uint8 buffer of the given masks [qlen, ctx] and each one's offset in it (-1: none)."""
    offs, parts, n = [], [], 0
    for m in masks:
        if m is None:
            offs.append(-1)
            continue
        offs.append(n)
        parts.append(m.reshape(-1).to(device=device, dtype=torch.uint8))
        n += m.numel()
    buf = torch.cat(parts) if parts else torch.zeros(1, dtype=torch.uint8, device=device)
    return buf, offs


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      bt_rows: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                      ctx_lens: torch.Tensor, max_q_len: int, scale: float,
                      sliding_window: int | None = None, softcap: float | None = None,
                      mask_offsets: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Requests r = 0..R-1 with q_lens[r] query rows from q_starts[r] in q [T, Hq, D], attending to
    ctx_lens[r] tokens of the cache through block_tables[bt_rows[r]] (the new tokens written there
    already). With ``masks`` (see pack_custom_masks), a request with mask_offsets[r] >= 0 uses its
    mask [qlen, ctx] instead of the causal and window masks. Writes the requests' rows of ``out``."""
    t, hq, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    r = q_lens.shape[0]
    if r == 0 or max_q_len == 0:
        return out
    q = _last_dim_contiguous(q)
    kc, vc, ks, vs, hd = _cache_views(kv_cache)
    hkv, block_size = kv_cache.shape[3], kv_cache.shape[2]
    assert hd == d and hq % hkv == 0 and out.stride(-1) == 1 and block_tables.stride(-1) == 1
    has_masks = masks is not None
    if not has_masks:
        mask_offsets, masks = q_lens, q_lens  # unused
    block_m, block_n, stages = _tiles(d, q.dtype)
    grid = (triton.cdiv(max_q_len, block_m), r, hq)
    _prefill_kernel[grid](
        q, kc, vc, ks, vs, out, block_tables,
        bt_rows, q_starts, q_lens, ctx_lens, mask_offsets, masks,
        scale, softcap if softcap else 1.0, sliding_window or 0,
        q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        block_size,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_D=_block_d(d),
        BLOCK_N=block_n, QUANT=kv_quant.is_quantized(kv_cache), SOFTCAP=bool(softcap),
        WINDOW=sliding_window is not None, HAS_MASKS=has_masks, IEEE=_ieee_dot(q.dtype),
        num_stages=stages,
    )
    return out
