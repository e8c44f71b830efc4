"""Weight-only quantized GEMM / GEMV (Triton): W8A16 and W4A16, dequantized in registers.

Activations stay in the model dtype (bfloat16, float16 or float32); every product accumulates in
float32.

- W4A16 with 16-bit activations, at every batch size up to 64: ``_w4_dot_kernel``, tensor cores
  (one row padded to 16 at batch 1). Each packed int32 tile becomes 8 planes of exact q - 8 in the
  activation dtype by inline PTX (two weights per LOP3 and per packed FMA, see _W4_PLANES_PTX),
  Triton keeps them in the MMA's register layout (no trip through shared memory), and scale and
  zero are applied once per group to the [BLOCK_M, BLOCK_N] partial sum. Large batches
  (``w4_dequant_mm``): the weight is dequantized once into a temporary and one dense GEMM runs.
  Which kernel and launch settings serve a batch size is the table ``W4_TUNING`` (measured,
  ``benchmarks/triton_quant_gemm.py --dot-sweep``; ``SOARLLM_W4A16_TUNING`` names a replacement).
- W4A16 with float32 activations (or where the table names it): a GEMV for M = 1 that keeps a
  [rows, BLOCK_N] float32 accumulator of elementwise products; M > 1 runs the tensor-core kernel
  on float32 planes (IEEE tl.dot).
- W8A16: the same GEMV / tiled ``tl.dot`` pair.

All split K over another grid axis when the output alone gives too few programs to fill the GPU;
the float32 partial sums [SPLIT_K, M, N] are then added by one small kernel (by the last program
of each output tile in the W4 dot kernel with ``fused_reduce``). Grids and split counts
depend only on shapes, so the launches are CUDA-graph capturable. The kernels are exposed as
``torch.library`` custom ops (``soarllm::w4a16_gemm``, ``soarllm::w8a16_gemm``) so torch.compile
treats them as opaque calls.

CUDA weight layouts (made once by ``pack_w4`` / ``pack_w8`` when the layer is on a CUDA device):

- W8A16: ``qweight`` int8 [K, N] (the transpose of the checkpoint's [N, K], so a tile's rows are
  contiguous along N and loads coalesce), ``scales`` float32 [N]; w[n, k] = q[k, n] * scale[n].
- W4A16: K is padded to a multiple of 128 (``PACK_K``). ``qweight`` int32 [K_pad / 8, N]; the
  int32 at row ``16 t + j`` holds, in nibble ``i`` (bits 4i..4i+3), the 4-bit value of input
  ``128 t + 16 i + j``: one shift and mask gives a [16, BLOCK_N] block of consecutive inputs, no
  interleaving (the M = 1 kernel masks each nibble in place instead of shifting, see
  _w4_gemv_kernel). ``scales`` and ``zeros`` are [K_pad / group, N] (bfloat16 for 16-bit models, as the
  CPU kernel keeps them; float32 otherwise) and w = (q - 8) * scale + zero as in quant/w4a16.py.
  (Folding the zero into zero - 8 * scale would save nothing and cost accuracy: both terms are
  then several times larger than w, and their bfloat16 rounding errors do not cancel.) Padding
  inputs have q = 0, scale = zero = 0.

Integer-to-float conversion is done with the exponent trick: (q | 0x4B000000) read as a float32 is
2**23 + q exactly, so one subtraction gives q, or q - 8 (conversion instructions are slow on GPUs).

Measured on an H200 (benchmarks/triton_quant_gemm.py, CUDA-graph replay, L2-cold, Llama-3-8B
shapes; one decoder layer's four GEMMs at group 128, results/gpu/w4_dot_sweep_s17_h200.json):
batch 1 79.8 us against bf16 cuBLAS 118.8 us (1.49x; the float32 GEMV 96.9 us, 1.19x), batch 16
84.3 us (1.42x; the float32-plane tl.dot kernel 141 us, 0.85x), batch 64 170 us (0.75x; 282 us
before), batch 256 329 us by dequantize + GEMM (0.57x; 839 us before). Still short of the
bandwidth: at batch 1 the int4 bytes stream at ~1/3 of the copy rate, and the split-K reduction
kernel takes 15% of a W4A16 decode step's device time (results/gpu/profile_s17_h200_w4a16.txt).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

PACK_K = 128  # W4 inputs per packed tile: 8 nibbles x 16 rows
_SEG = 16  # W4 inputs per nibble plane of a tile (the tl.dot K of the W4 kernel)
_W8_BLOCK_K = 32


# ---------------------------------------------------------------------------------------------
# layouts (plain PyTorch)


def pack_w4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
            scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA layout from unpacked values q [N, K] in [0, 16) and per-group scales / zeros [N, K/g]
    (quant/w4a16.py's convention): (qweight int32 [K_pad/8, N], scales, zeros [K_pad/g, N])."""
    n, k = q.shape
    k_pad = triton.cdiv(k, PACK_K) * PACK_K
    qt = torch.zeros((k_pad, n), dtype=torch.int64, device=q.device)
    qt[:k] = q.t().to(torch.int64)
    qt = qt.view(k_pad // PACK_K, 8, _SEG, n)
    packed = torch.zeros((k_pad // PACK_K, _SEG, n), dtype=torch.int64, device=q.device)
    for i in range(8):
        packed |= qt[:, i] << (4 * i)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    groups = k_pad // group_size
    s = torch.zeros((groups, n), dtype=torch.float32, device=q.device)
    z = torch.zeros_like(s)
    s[: k // group_size] = scales.float().t()
    z[: k // group_size] = zeros.float().t()
    return (packed.view(k_pad // 8, n).contiguous(), s.to(scale_dtype).contiguous(),
            z.to(scale_dtype).contiguous())


def w4_scale_dtype(params_dtype: torch.dtype) -> torch.dtype:
    """Scales and zeros of the CUDA layout: bfloat16 for 16-bit models (a quarter of the bytes of
    the weights at group 32, as float32 would be half), float32 for float32 models."""
    return torch.float32 if params_dtype == torch.float32 else torch.bfloat16


def unpack_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              in_features: int) -> torch.Tensor:
    """The float32 weight [N, K] a packed W4 layout computes with (for tests and comparisons)."""
    rows, n = qweight.shape
    p = qweight.view(rows // _SEG, _SEG, n).to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(p >> (4 * i)) & 0xF for i in range(8)], dim=1)  # [tiles, 8, 16, N]
    q = q.reshape(rows * 8, n).float()
    g = torch.arange(rows * 8, device=q.device) // group_size
    w = (q - 8) * scales.float()[g] + zeros.float()[g]
    return w[:in_features].t().contiguous()


def pack_w8(qweight: torch.Tensor) -> torch.Tensor:
    """CUDA layout of int8 [N, K]: its transpose [K, N], contiguous."""
    return qweight.t().contiguous()


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _w4_plane(p, s_ptr, z_ptr, t, offs_n, nmask, N, PLANE: tl.constexpr, GROUP: tl.constexpr):
    """Dequantized float32 weights [16, BLOCK_N] of inputs 128 t + 16 PLANE + (0..15)."""
    g = (t * 128 + PLANE * 16) // GROUP
    s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
    return _w4_plane_q8(p, PLANE, tl.float32) * s[None, :] + z[None, :]


@triton.jit
def _w4_gemv_tile(acc, acc_z, p, x_ptr, s_ptr, z_ptr, t, offs_n, nmask, N, K,
                  GROUP: tl.constexpr):
    """Accumulate one packed 128-input tile p [16, BLOCK_N] (see _w4_gemv_kernel)."""
    rows = tl.arange(0, 16)
    p_hi = p >> 12
    for i in tl.static_range(8):
        if i < 5:
            bits = (p & (15 << (4 * i))) | 0x4B000000
            x_scale = 1.0 / (1 << (4 * i))
        else:
            bits = (p_hi & (15 << (4 * i - 12))) | 0x4B000000
            x_scale = 1.0 / (1 << (4 * i - 12))
        qs = bits.to(tl.float32, bitcast=True) - 8388608.0  # q * 2**shift, exact
        k = t * 128 + i * 16 + rows
        xk = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        if i % (GROUP // 16) == 0:
            acc_q = qs * (xk * x_scale)[:, None]
            x_rows = xk
        else:
            acc_q += qs * (xk * x_scale)[:, None]
            x_rows += xk
        if (i + 1) % (GROUP // 16) == 0:
            g = t * (128 // GROUP) + i // (GROUP // 16)
            sc = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
            acc += acc_q * sc[None, :]
            acc_z += (z - 8.0 * sc) * tl.sum(x_rows, axis=0)
    return acc, acc_z


@triton.jit
def _w4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, K, tiles_per_split,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                    UNROLL: tl.constexpr):
    """M = 1. The loop loads UNROLL packed tiles before using any (more bytes in flight per
    thread: a GEMV is bound by memory-level parallelism), and keeps ALU work per weight small:

    - nibble i of a word is masked in place and OR-ed under the exponent of 2**23, so one LOP3 and
      one subtraction give q * 2**shift exactly (shift = 4i for i < 5; planes 5..7 come from the
      word shifted right by 12, shift = 4i - 12); x is scaled by 2**-shift instead (exact);
    - the scale factors out of a group: sum_k x_k ((q_k - 8) s + z) = s sum_k x_k q_k
      + (z - 8 s) sum_k x_k, so per weight one FMA accumulates x * q, and a group's partial sums
      are scaled once (z - 8 s is formed in float32 registers, not stored).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    rows = tl.arange(0, 16)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = t_start + tiles_per_split  # splits divide the tiles evenly, in steps of UNROLL
    n64 = N.to(tl.int64)
    w_ptrs = qw_ptr + rows.to(tl.int64)[:, None] * n64 + offs_n[None, :]
    for t0 in range(t_start, t_end, UNROLL):
        p0 = tl.load(w_ptrs + t0 * 16 * n64, mask=nmask[None, :], other=0)
        if UNROLL >= 2:
            p1 = tl.load(w_ptrs + (t0 + 1) * 16 * n64, mask=nmask[None, :], other=0)
        if UNROLL >= 4:
            p2 = tl.load(w_ptrs + (t0 + 2) * 16 * n64, mask=nmask[None, :], other=0)
            p3 = tl.load(w_ptrs + (t0 + 3) * 16 * n64, mask=nmask[None, :], other=0)
        acc, acc_z = _w4_gemv_tile(acc, acc_z, p0, x_ptr, s_ptr, z_ptr, t0, offs_n, nmask, N, K,
                                   GROUP)
        if UNROLL >= 2:
            acc, acc_z = _w4_gemv_tile(acc, acc_z, p1, x_ptr, s_ptr, z_ptr, t0 + 1, offs_n, nmask,
                                       N, K, GROUP)
        if UNROLL >= 4:
            acc, acc_z = _w4_gemv_tile(acc, acc_z, p2, x_ptr, s_ptr, z_ptr, t0 + 2, offs_n, nmask,
                                       N, K, GROUP)
            acc, acc_z = _w4_gemv_tile(acc, acc_z, p3, x_ptr, s_ptr, z_ptr, t0 + 3, offs_n, nmask,
                                       N, K, GROUP)
    out = tl.sum(acc, axis=0) + acc_z
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(out_ptr + pid_k * N + offs_n, out, mask=nmask)


@triton.jit
def _split_k_reduce_kernel(ws_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum of the SPLIT_K float32 partials [SPLIT_K, numel], in out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Eight planes of 4-bit values from packed int32s, as exact 16-bit floats q - 8 (Marlin's trick,
# in PTX), two int32s per call: the two elements a thread holds side by side (the (k, k + 1) pair
# one tensor-core register carries). PRMT first interleaves their 16-bit halves, so that in each
# 32-bit register the two values of one plane sit 16 bits apart; then one LOP3
# ((w & 0x000F000F) | magic) puts both nibbles under the exponent of 2**7 (bfloat16 0x4300) or
# 2**10 (float16 0x6400), and one packed FMA subtracts 2**7 + 8 (2**10 + 8) from both, leaving
# q - 8 exactly, already paired as the MMA reads it: 1.5 instructions per weight. (One int32 per
# call with eight 16-bit outputs, which the compiler then re-pairs, measured ~15% slower.)
def _w4_ptx_for(half: str) -> tl.constexpr:
    """The PTX of _w4_planes for bfloat16 ("bf16") or float16 ("f16") outputs: inputs $8, $9 (two
    int32s), outputs $0..$7 (plane i in $i, two values each)."""
    magic, one, bias, kind = {"bf16": ("0x43004300", "0x3F803F80", "0xC308C308", "bf16x2"),
                              "f16": ("0x64006400", "0x3C003C00", "0xE408E408", "f16x2")}[half]
    lines = [".reg .b32 lo, hi, one, bias;", f"mov.b32 one, {one};", f"mov.b32 bias, {bias};",
             "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    for i in range(4):  # planes i (low nibbles of each half) and i + 4 (the high ones)
        if i:
            lines += ["shr.u32 lo, lo, 4;", "shr.u32 hi, hi, 4;"]
        lines += [f"lop3.b32 ${i}, lo, 0x000F000F, {magic}, 0xea;",
                  f"lop3.b32 ${i + 4}, hi, 0x000F000F, {magic}, 0xea;"]
    lines += [f"fma.rn.{kind} ${i}, ${i}, one, bias;" for i in range(8)]
    return tl.constexpr("{\n" + "\n".join(lines) + "\n}")


W4_PLANES_BF16 = _w4_ptx_for("bf16")
W4_PLANES_F16 = _w4_ptx_for("f16")


@triton.jit
def _w4_planes(p, DT: tl.constexpr, ASM: tl.constexpr):
    """The 8 planes of a packed tile p [16, BLOCK_N] as q - 8 in DT (exact): plane i holds
    inputs 16 i + (0..15). ASM: the packed PTX above (16-bit DT on a GPU); otherwise plain shifts
    and masks (the interpreter, float32)."""
    if ASM:
        if DT == tl.bfloat16:
            return tl.inline_asm_elementwise(W4_PLANES_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [p],
                                             dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise(W4_PLANES_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [p],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    else:
        return (_w4_plane_q8(p, 0, DT), _w4_plane_q8(p, 1, DT), _w4_plane_q8(p, 2, DT),
                _w4_plane_q8(p, 3, DT), _w4_plane_q8(p, 4, DT), _w4_plane_q8(p, 5, DT),
                _w4_plane_q8(p, 6, DT), _w4_plane_q8(p, 7, DT))


@triton.jit
def _w4_plane_q8(p, PLANE: tl.constexpr, DT: tl.constexpr):
    """Plane PLANE of p as q - 8 in DT: 2**23 + q (the nibble under a float32 exponent) minus
    2**23 + 8, exact."""
    q = (((p >> (4 * PLANE)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return q.to(DT)


@triton.jit
def _w4_dot_group(acc, x_rows, k0, mmask, K, w_plane, ones, s_ptr, z_ptr, t, offs_n, nmask, N,
                  PLANE: tl.constexpr, GROUP: tl.constexpr, acc_g, x_sum,
                  XSUM_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One plane (16 inputs) of a group: acc_g += x[:, plane] @ (q - 8), and the row sums of x
    for the zero term; at the group's last plane, acc += s * acc_g + z * (row sums of x).
    XSUM_DOT: the row sums as x[:, plane] @ ones on the tensor cores, already broadcast over the
    block's columns (x_sum [BLOCK_M, BLOCK_N]); otherwise x itself is added up over the group
    (x_sum [BLOCK_M, 16]) and reduced across the warp once per group. (A reduction per plane
    measured 1.5-2.3x slower than the ones product.)"""
    rows = tl.arange(0, 16)
    k = k0 + PLANE * 16 + rows
    xa = tl.load(x_rows + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0)
    if PLANE % (GROUP // 16) == 0:
        acc_g = tl.dot(xa, w_plane, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        if XSUM_DOT:
            x_sum = tl.dot(xa, ones, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        else:
            x_sum = xa.to(tl.float32)
    else:
        acc_g = tl.dot(xa, w_plane, acc=acc_g, input_precision=DOT_PRECISION)
        if XSUM_DOT:
            x_sum = tl.dot(xa, ones, acc=x_sum, input_precision=DOT_PRECISION)
        else:
            x_sum += xa.to(tl.float32)
    if (PLANE + 1) % (GROUP // 16) == 0:
        g = t * (128 // GROUP) + PLANE // (GROUP // 16)
        s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
        if XSUM_DOT:
            acc += acc_g * s[None, :] + x_sum * z[None, :]
        else:
            acc += acc_g * s[None, :] + tl.sum(x_sum, axis=1)[:, None] * z[None, :]
    return acc, acc_g, x_sum


@triton.jit
def _w4_dot_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, final_ptr, tickets_ptr, M, N, K,
                   stride_xm, tiles_per_split, num_splits,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ASM: tl.constexpr, FUSED_REDUCE: tl.constexpr, XSUM_DOT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Tensor-core W4 GEMM for any M (one row padded to BLOCK_M = 16 at batch 1): each packed tile
    becomes 8 planes of exact q - 8 in the activation dtype (see _w4_planes), multiplied with x
    by tl.dot in float32; scale and zero are applied once per group to the [BLOCK_M, BLOCK_N]
    partial sum: sum_k x_k ((q_k - 8) s + z) = s sum_k x_k (q_k - 8) + z sum_k x_k. No product is
    rounded (x times a 4-bit integer is exact in float32), unlike rounding dequantized weights.
    out is contiguous [M, N] without a split, else float32 partials [splits, M, N]: the split
    count is not a compile-time constant (one binary serves every shape of a configuration).
    FUSED_REDUCE (with a split): no second kernel adds the partials; each program takes a ticket
    for its output tile after storing its partial (a CTA barrier, then an acq_rel atomic), and
    the program that takes the last one adds the tile's partials into final (the
    fixup of split-K "serial" GEMMs) and resets the ticket for the next launch or graph replay."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    rows = tl.arange(0, 16)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if XSUM_DOT:
        x_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        x_sum = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    ones = tl.full([16, BLOCK_N], 1.0, tl.float32).to(dt)
    t_start = pid_k * tiles_per_split
    t_end = t_start + tiles_per_split  # splits divide the tiles evenly
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    n64 = N.to(tl.int64)
    w_ptrs = qw_ptr + rows.to(tl.int64)[:, None] * n64 + offs_n[None, :]
    for t in range(t_start, t_end):
        p = tl.load(w_ptrs + t * 16 * n64, mask=nmask[None, :], other=0)
        planes = _w4_planes(p, dt, ASM)
        for i in tl.static_range(8):
            acc, acc_g, x_sum = _w4_dot_group(acc, x_rows, t * 128, mmask, K, planes[i], ones,
                                              s_ptr, z_ptr, t, offs_n, nmask, N, i, GROUP, acc_g,
                                              x_sum, XSUM_DOT, DOT_PRECISION)
    tile = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    mask = mmask[:, None] & nmask[None, :]
    tl.store(out_ptr + pid_k.to(tl.int64) * M * N + tile, acc.to(out_ptr.dtype.element_ty),
             mask=mask)
    if FUSED_REDUCE:
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket_ptr = tickets_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == num_splits - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in range(num_splits):
                total += tl.load(out_ptr + k * M * N + tile, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(final_ptr + tile, total.to(final_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _w4_dequant_kernel(qw_ptr, s_ptr, z_ptr, wt_ptr, N, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """W^T [K_pad, N] in wt's dtype from the packed layout, one 128-input tile per program row:
    w = (q - 8) * scale + zero (for large M, where a bfloat16 GEMM on the dequantized weight
    beats dequantizing inside every output tile)."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    rows = tl.arange(0, 16)
    n64 = N.to(tl.int64)
    p = tl.load(qw_ptr + (t * 16 + rows).to(tl.int64)[:, None] * n64 + offs_n[None, :],
                mask=nmask[None, :], other=0)
    for i in tl.static_range(8):
        w = _w4_plane(p, s_ptr, z_ptr, t, offs_n, nmask, N, i, GROUP)
        k = t * 128 + i * 16 + rows
        tl.store(wt_ptr + k.to(tl.int64)[:, None] * n64 + offs_n[None, :],
                 w.to(wt_ptr.dtype.element_ty), mask=nmask[None, :])


@triton.jit
def _store_tile(acc, out_ptr, offs_m, offs_n, mmask, nmask, M, N, stride_om, pid_k,
                SPLIT_K: tl.constexpr):
    mask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        base = out_ptr + pid_k.to(tl.int64) * M * N
        tl.store(base + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _int8_to_float(q):
    """int8 -> float32 exactly: the bits of 2**23 + 128 plus q are those of 2**23 + 128 + q
    (0 < 128 + q < 256 stays inside the mantissa), minus 2**23 + 128."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _w8_gemv_kernel(x_ptr, qw_ptr, s_ptr, out_ptr, N, K, k_per_split,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                    UNROLL: tl.constexpr):
    """M = 1: UNROLL [BLOCK_K, BLOCK_N] int8 tiles loaded before use, one FMA per weight, the
    per-channel scale applied once at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    rows = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = k_start + k_per_split  # splits divide the steps evenly; k < K masks the tail
    for k0 in range(k_start, k_end, BLOCK_K * UNROLL):
        q0 = _w8_load(qw_ptr, k0 + rows, offs_n, nmask, N, K)
        if UNROLL >= 2:
            q1 = _w8_load(qw_ptr, k0 + BLOCK_K + rows, offs_n, nmask, N, K)
        if UNROLL >= 4:
            q2 = _w8_load(qw_ptr, k0 + 2 * BLOCK_K + rows, offs_n, nmask, N, K)
            q3 = _w8_load(qw_ptr, k0 + 3 * BLOCK_K + rows, offs_n, nmask, N, K)
        acc += _int8_to_float(q0) * _x_col(x_ptr, k0 + rows, K)
        if UNROLL >= 2:
            acc += _int8_to_float(q1) * _x_col(x_ptr, k0 + BLOCK_K + rows, K)
        if UNROLL >= 4:
            acc += _int8_to_float(q2) * _x_col(x_ptr, k0 + 2 * BLOCK_K + rows, K)
            acc += _int8_to_float(q3) * _x_col(x_ptr, k0 + 3 * BLOCK_K + rows, K)
    scale = tl.load(s_ptr + offs_n, mask=nmask, other=0.0)
    out = tl.sum(acc, axis=0) * scale
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(out_ptr + pid_k * N + offs_n, out, mask=nmask)


@triton.jit
def _w8_load(qw_ptr, k, offs_n, nmask, N, K):
    return tl.load(qw_ptr + k.to(tl.int64)[:, None] * N + offs_n[None, :],
                   mask=(k < K)[:, None] & nmask[None, :], other=0)


@triton.jit
def _x_col(x_ptr, k, K):
    return tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _w8_gemm_kernel(x_ptr, qw_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_om, k_per_split,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    rows = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = k_start + k_per_split  # splits divide the BLOCK_K steps evenly; k < K masks the tail
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rows
        kmask = k < K
        xa = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        q = tl.load(qw_ptr + k.to(tl.int64)[:, None] * N + offs_n[None, :],
                    mask=kmask[:, None] & nmask[None, :], other=0)
        w = _int8_to_float(q)
        acc = tl.dot(xa, w.to(x_ptr.dtype.element_ty), acc=acc, input_precision=DOT_PRECISION)
    scale = tl.load(s_ptr + offs_n, mask=nmask, other=0.0)
    acc = acc * scale[None, :]
    _store_tile(acc, out_ptr, offs_m, offs_n, mmask, nmask, M, N, stride_om, pid_k, SPLIT_K)


# ---------------------------------------------------------------------------------------------
# launch


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return 16  # the interpreter on CPU: any small count exercises split-K
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def _split_k(programs: int, steps: int, device: torch.device, per_sm: int = 4,
             min_steps: int = 2) -> int:
    """Power-of-2 split of the K loop so that about ``per_sm`` programs per SM run, each with at
    least ``min_steps`` loop steps; it divides the steps evenly (plain loop bounds, no min)."""
    target = per_sm * _num_sms(device.index if device.type == "cuda" else None)
    split = 1
    while (split < 32 and programs * split < target and steps % (2 * split) == 0
           and steps >= 2 * split * min_steps):
        split *= 2
    return split


def _unroll(steps: int, unroll: int) -> int:
    while steps % unroll:
        unroll //= 2
    return unroll


def _gemm_config(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the tl.dot kernels by batch bucket."""
    if m <= 16:
        return 16, 64, 4
    if m <= 64:
        return 32, 64, 4
    return 64, 64, 4


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _finish(ws: torch.Tensor, out: torch.Tensor, split: int) -> torch.Tensor:
    """Add the split-K partials into out (one small kernel; out is contiguous)."""
    if split > 1:
        numel = out.numel()
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(numel, block),)](ws, out, numel, SPLIT_K=split,
                                                             BLOCK=block, num_warps=4)
    return out


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def w4_gemv(x, qweight, scales, zeros, group_size, out, block_n=None, num_warps=2, per_sm=4,
            unroll=1):
    """M = 1 W4A16 launch. Defaults measured on an H200 (benchmarks/triton_quant_gemm.py --sweep,
    Llama-3-8B shapes): 2 warps, BLOCK_N 256 (128 for K > 8192), no unrolling."""
    k, n = x.shape[1], qweight.shape[1]
    if block_n is None:
        block_n = 256 if k <= 8192 else 128
    n_tiles = qweight.shape[0] // _SEG
    unroll = _unroll(n_tiles, unroll)
    programs = triton.cdiv(n, block_n)
    split = _split_k(programs, n_tiles // unroll, x.device, per_sm, min_steps=1)
    ws = torch.empty((split, 1, n), dtype=torch.float32, device=x.device) if split > 1 else out
    _w4_gemv_kernel[(programs, split)](
        x, qweight, scales, zeros, ws, n, k, n_tiles // split,
        GROUP=group_size, BLOCK_N=block_n, SPLIT_K=split, UNROLL=unroll, num_warps=num_warps,
    )
    return _finish(ws, out, split)


def w8_gemv(x, qweight, scales, out, block_n=128, num_warps=None, per_sm=4, unroll=2):
    """M = 1 W8A16 launch. Defaults measured on an H200 (benchmarks/triton_quant_gemm.py --sweep):
    BLOCK_N 128, two tiles per loop step, 2 warps (4 for N > 8192)."""
    k, n = x.shape[1], qweight.shape[1]
    if num_warps is None:
        num_warps = 2 if n <= 8192 else 4
    block_k = _W8_BLOCK_K
    steps = triton.cdiv(k, block_k)
    unroll = _unroll(steps, unroll)
    programs = triton.cdiv(n, block_n)
    split = _split_k(programs, steps // unroll, x.device, per_sm, min_steps=1)
    ws = torch.empty((split, 1, n), dtype=torch.float32, device=x.device) if split > 1 else out
    _w8_gemv_kernel[(programs, split)](
        x, qweight, scales, ws, n, k, steps // split * block_k,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, UNROLL=unroll, num_warps=num_warps,
    )
    return _finish(ws, out, split)


def _w4_asm(x: torch.Tensor) -> bool:
    """The packed-PTX dequantization runs on CUDA for 16-bit activations (not in the interpreter)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def w4_dot(x, qweight, scales, zeros, group_size, out, block_m=16, block_n=64, num_warps=4,
           per_sm=4, num_stages=3, fused_reduce=False, xsum_dot=True):
    """Tensor-core W4A16 launch (_w4_dot_kernel) for any M. fused_reduce: the split-K partials
    are added by the kernel's last program per tile instead of a second kernel; xsum_dot: how
    the kernel sums x for the zero term (see _w4_dot_group)."""
    m, k = x.shape
    n = qweight.shape[1]
    n_tiles = qweight.shape[0] // _SEG
    grid_mn = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    split = _split_k(grid_mn[0] * grid_mn[1], n_tiles, x.device, per_sm, min_steps=1)
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    fused = fused_reduce and split > 1 and grid_mn[0] * grid_mn[1] <= _MAX_TICKETS
    tickets = _tickets(x.device) if fused else ws
    _w4_dot_kernel[(*grid_mn, split)](
        x, qweight, scales, zeros, ws, out, tickets, m, n, k, x.stride(0), n_tiles // split, split,
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, ASM=_w4_asm(x), FUSED_REDUCE=fused,
        XSUM_DOT=xsum_dot, DOT_PRECISION=_precision(x), num_warps=num_warps, num_stages=num_stages,
    )
    return out if fused else _finish(ws, out, split)


_TICKETS: dict[torch.device, torch.Tensor] = {}
_MAX_TICKETS = 1 << 16  # output tiles of one launch; more (never at real shapes) skip the fusion


def _tickets(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters of the fused split-K reduction, one per output tile: one buffer per
    device, never replaced (captured graphs keep its address), shared by every launch (launches
    on one stream never overlap, and each resets the counters it used)."""
    buf = _TICKETS.get(device)
    if buf is None:
        buf = _TICKETS[device] = torch.zeros(_MAX_TICKETS, dtype=torch.int32, device=device)
    return buf


def w4_dequant_mm(x, qweight, scales, zeros, group_size, out, block_n=128):
    """Large-M W4A16: dequantize W^T once into a temporary in x's dtype, then one dense GEMM."""
    k = x.shape[1]
    rows, n = qweight.shape
    wt = torch.empty((rows * 8, n), dtype=x.dtype, device=x.device)
    _w4_dequant_kernel[(rows // _SEG, triton.cdiv(n, block_n))](
        qweight, scales, zeros, wt, n, GROUP=group_size, BLOCK_N=block_n, num_warps=4)
    return torch.mm(x, wt[:k], out=out)


# Which W4A16 kernel and launch settings run for 16-bit activations, by batch bucket (the
# smallest key >= M). "gemv": _w4_gemv_kernel (M = 1 only); "dot": _w4_dot_kernel with w4_dot's
# keyword arguments; "dequant": w4_dequant_mm. SOARLLM_W4A16_TUNING names a JSON file of the
# same shape (benchmarks/triton_quant_gemm.py --dot-sweep writes one) that replaces it.
W4_TUNING: dict[int, dict] = {  # an H200's winners (benchmarks/results/gpu/w4_dot_sweep_s17_h200.json)
    1: dict(kernel="dot", block_n=128, num_warps=2, num_stages=3, per_sm=2),
    16: dict(kernel="dot", block_m=16, block_n=256, num_warps=4, num_stages=3, per_sm=1),
    64: dict(kernel="dot", block_m=32, block_n=256, num_warps=4, num_stages=3, per_sm=1),
    1 << 30: {"kernel": "dequant"},
}


@functools.cache
def _w4_tuning() -> dict[int, dict]:
    import json
    import os

    path = os.environ.get("SOARLLM_W4A16_TUNING")
    if not path:
        return W4_TUNING
    table = {int(key): value for key, value in json.loads(open(path).read()).items()}
    return dict(sorted(table.items()))


def w4_config(m: int, dtype: torch.dtype) -> dict:
    """The W4A16 kernel and launch settings for M rows of ``dtype`` (float32: the float32 kernels)."""
    if dtype == torch.float32:
        return {"kernel": "gemv" if m == 1 else "dot" if m <= 64 else "dequant"}
    for bound, config in _w4_tuning().items():
        if m <= bound:
            return config if m == 1 or config["kernel"] != "gemv" else {"kernel": "dot"}
    return {"kernel": "dequant"}


def _w4a16_gemm_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    m = x.shape[0]
    out = torch.empty((m, qweight.shape[1]), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    config = dict(w4_config(m, x.dtype))
    kernel = config.pop("kernel")
    if kernel == "gemv":
        return w4_gemv(x, qweight, scales, zeros, group_size, out, **config)
    if kernel == "dequant":
        return w4_dequant_mm(x, qweight, scales, zeros, group_size, out, **config)
    return w4_dot(x, qweight, scales, zeros, group_size, out, **config)


def _w8a16_gemm_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if m == 1:
        return w8_gemv(x, qweight, scales, out)
    block_m, block_n, warps = _gemm_config(m)
    block_k = 64
    grid_mn = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    steps = triton.cdiv(k, block_k)
    split = _split_k(grid_mn[0] * grid_mn[1], steps, x.device)
    kps = steps // split * block_k
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    _w8_gemm_kernel[(*grid_mn, split)](
        x, qweight, scales, ws, m, n, k, x.stride(0), out.stride(0), kps,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
        DOT_PRECISION=_precision(x), num_warps=warps,
    )
    return _finish(ws, out, split)


# Custom ops: opaque to torch.compile (dynamo does not trace the launch code), graph-capturable.
@torch.library.custom_op("soarllm::w4a16_gemm", mutates_args=())
def _w4a16_gemm_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    return _w4a16_gemm_impl(x, qweight, scales, zeros, group_size)


@_w4a16_gemm_op.register_fake
def _(x, qweight, scales, zeros, group_size):
    return x.new_empty((x.shape[0], qweight.shape[1]))


@torch.library.custom_op("soarllm::w8a16_gemm", mutates_args=())
def _w8a16_gemm_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return _w8a16_gemm_impl(x, qweight, scales)


@_w8a16_gemm_op.register_fake
def _(x, qweight, scales):
    return x.new_empty((x.shape[0], qweight.shape[1]))


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T for a ``pack_w4`` layout; output [..., N] in x's dtype."""
    rows = _as_rows(x)
    if rows.shape[1] > qweight.shape[0] * 8:
        raise ValueError(f"w4a16_gemm: x has {rows.shape[1]} inputs, the weight {qweight.shape[0] * 8}")
    out = torch.ops.soarllm.w4a16_gemm(rows, qweight, scales, zeros, group_size)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], qweight.shape[1])


def w8a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T for a ``pack_w8`` layout (int8 [K, N], float32 scales [N])."""
    rows = _as_rows(x)
    if rows.shape[1] != qweight.shape[0]:
        raise ValueError(f"w8a16_gemm: x has {rows.shape[1]} inputs, the weight {qweight.shape[0]}")
    out = torch.ops.soarllm.w8a16_gemm(rows, qweight, scales)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], qweight.shape[1])
