"""Rotary embedding (Triton), NeoX rotate-half style, applied in place; optionally fused with the
paged KV-cache write.

    out[:h]  = x[:h] * cos[:h] - x[h:rd] * sin[:h]         h = rotary_dim / 2
    out[h:rd] = x[h:rd] * cos[h:rd] + x[:h] * sin[h:rd]    x[rd:] passes through

``cos``/``sin`` are the rows layers/rotary.py's ``RotaryEmbedding.lookup`` returns ([T, 1, rd] or
[T, rd], already gathered by position, in the activations' dtype). One program per token rotates
all its q and k heads (q and k may be strided views, e.g. slices of the fused QKV output). The
products are computed in float32 and rounded once.

``rotary_embedding_and_cache_write`` also stores the rotated keys and the values into the paged
cache [2, num_blocks, block_size, H_kv, D] at each token's slot (slots < 0 are padding, skipped).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soarllm.errors import ConfigError


@triton.jit
def _rotate_heads(x_ptr, stride_h, n_heads, cos1, cos2, sin1, sin2, half,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the [n_heads, rd] block at x_ptr in place; returns the rotated halves (float32)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (d < half)
    p1 = x_ptr + heads * stride_h + d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos1 - x2 * sin1
    o2 = x2 * cos2 + x1 * sin2
    tl.store(p1, o1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + half, o2.to(x_ptr.dtype.element_ty), mask=mask)
    return o1, o2


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    stride_ckv, stride_cblock, stride_cslot, stride_chead,
    n_q_heads, n_kv_heads, half, head_dim, block_size,
    HAS_K: tl.constexpr, WRITE_CACHE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < half
    cos1 = tl.load(cos_ptr + t * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * stride_cos + half + d, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * stride_cos + half + d, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, n_q_heads, cos1, cos2, sin1, sin2, half,
                  BLOCK_HQ, BLOCK_HALF)
    if HAS_K:
        k1, k2 = _rotate_heads(k_ptr + t * stride_kt, stride_kh, n_kv_heads, cos1, cos2, sin1, sin2,
                               half, BLOCK_HKV, BLOCK_HALF)
        if WRITE_CACHE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                base = (cache_ptr + (slot // block_size) * stride_cblock
                        + (slot % block_size) * stride_cslot)
                heads = tl.arange(0, BLOCK_HKV)[:, None]
                hmask = heads < n_kv_heads
                kc = base + heads * stride_chead + d
                ty = cache_ptr.dtype.element_ty
                tl.store(kc, k1.to(k_ptr.dtype.element_ty).to(ty), mask=hmask & dmask)
                tl.store(kc + half, k2.to(k_ptr.dtype.element_ty).to(ty), mask=hmask & dmask)
                cols = tl.arange(0, BLOCK_D)[None, :]
                full = hmask & (cols < head_dim)
                tail = full & (cols >= 2 * half)  # dimensions past rotary_dim pass through
                k_row = k_ptr + t * stride_kt + heads * stride_kh + cols
                k_tail = tl.load(k_row, mask=tail, other=0.0)
                tl.store(base + heads * stride_chead + cols, k_tail.to(ty), mask=tail)
                v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + cols, mask=full, other=0.0)
                tl.store(base + stride_ckv + heads * stride_chead + cols, v.to(ty), mask=full)


def _table(x: torch.Tensor, tokens: int) -> torch.Tensor:
    t = x.reshape(tokens, -1)
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_heads(name: str, x: torch.Tensor, tokens: int) -> None:
    if x.dim() != 3 or x.shape[0] != tokens or x.stride(-1) != 1:
        raise ValueError(f"rotary_embedding: {name} must be [T, heads, head_dim] with unit stride in "
                         f"head_dim, got shape {tuple(x.shape)} strides {x.stride()}")


def _launch(q, k, v, cos, sin, kv_cache, slot_mapping):
    tokens, n_q, head_dim = q.shape
    _check_heads("q", q, tokens)
    cos_t, sin_t = _table(cos, tokens), _table(sin, tokens)
    rd = cos_t.shape[1]
    if rd % 2 or rd > head_dim or sin_t.shape != cos_t.shape:
        raise ValueError(f"rotary_embedding: cos/sin rows of {rd} do not fit head_dim {head_dim}")
    n_kv = 0
    if k is not None:
        _check_heads("k", k, tokens)
        n_kv = k.shape[1]
    write = kv_cache is not None
    if write:
        _check_heads("v", v, tokens)
        if kv_cache.dtype == torch.int8:
            raise ConfigError("the fused rotary + cache write stores float caches only; with "
                              "kv_cache_dtype='int8' write the cache with kernels.attention.write_kv")
        if kv_cache.dim() != 5 or kv_cache.shape[3:] != (n_kv, head_dim) or kv_cache.stride(-1) != 1:
            raise ValueError(f"kv_cache must be [2, blocks, block_size, {n_kv}, {head_dim}], "
                             f"got {tuple(kv_cache.shape)}")
    if tokens == 0:
        return
    kk = k if k is not None else q
    vv = v if write else q
    cache = kv_cache if write else q
    slots = slot_mapping if write else q
    cs = kv_cache.stride() if write else (0, 0, 0, 0)
    _rope_kernel[(tokens,)](
        q, kk, vv, cos_t, sin_t, cache, slots,
        q.stride(0), q.stride(1), kk.stride(0), kk.stride(1), vv.stride(0), vv.stride(1),
        cos_t.stride(0), cs[0], cs[1], cs[2], cs[3],
        n_q, n_kv, rd // 2, head_dim, kv_cache.shape[2] if write else 1,
        HAS_K=k is not None, WRITE_CACHE=write,
        BLOCK_HQ=triton.next_power_of_2(n_q), BLOCK_HKV=triton.next_power_of_2(max(n_kv, 1)),
        BLOCK_HALF=triton.next_power_of_2(max(rd // 2, 1)), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )


def rotary_embedding(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] (k may be None) in place; returns them."""
    _launch(q, k, None, cos, sin, None, None)
    return q, k


def rotary_embedding_and_cache_write(q, k, v, cos, sin, kv_cache, slot_mapping):
    """Rotate q and k in place and store the rotated k and v [T, Hkv, D] into the paged cache
    [2, num_blocks, block_size, Hkv, D] at ``slot_mapping`` [T] (slots < 0 skipped)."""
    _launch(q, k, v, cos, sin, kv_cache, slot_mapping)
    return q, k
