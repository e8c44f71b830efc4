"""W4A16: 4-bit weights, group-wise asymmetric, activations in the model dtype.

The format is tinygemm's (torchao's int4 weight-only layout), which PyTorch's CPU kernel
``_weight_int4pack_mm_for_cpu`` reads: each weight is

    w = (q - 8) * scale + zero        q in [0, 16), one (scale, zero) per `group_size` inputs

with `zero` a float (not an integer zero point). GGUF's Q4_0, Q4_1 and Q4_K blocks map onto it
exactly (quant/gguf.py); float checkpoints are quantized here by round-to-nearest (RTN).

While loading, `qweight` holds two 4-bit values per byte (even input column in the low nibble)
and `scales` / `zeros` are float32 [out, in / group]. After loading, on the CPU, they become the
kernel's packed weight and one [in / group, out, 2] scale-and-zero tensor (output rows padded to
a multiple of 16, the kernel's tile). On CUDA (with triton installed) they become the layout of the
Triton GEMV/GEMM in kernels/triton/quant_gemm.py (int32 words of eight K-consecutive nibbles, [K/8, N];
scales and zeros [K / group, N]), which dequantizes in registers. Elsewhere the layer dequantizes
and calls F.linear.

The CPU kernel is fast only with bfloat16 activations: its float32 and float16 paths are scalar
loops, about 30x slower at batch 1 on an AVX-512 machine and worse for larger batches. So it always
runs in bfloat16 (scales and zeros rounded to bfloat16, 8 significant bits; the float32
accumulation is the kernel's own); a float32 or float16 model hands it bfloat16 copies of the
activations and gets its output back in its own dtype.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from soarllm.config import cpu_has_native_bf16
from soarllm.errors import ConfigError
from soarllm.kernels.ops import define_op
from soarllm.kernels.triton_utils import triton_available
from soarllm.quant import vnni
from soarllm.quant.base import (
    QuantMethod,
    as_float,
    check_rows,
    load_rows,
    new_param,
    set_weight_loader,
    shard_range,
)

GROUP_SIZES = (32, 64, 128)
_N_TILE = 16  # the CPU kernel packs output rows in tiles of 16
KERNEL_DTYPE = torch.bfloat16  # the one activation dtype the CPU kernel is fast for


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[rows, cols] values in [0, 16) -> uint8 [rows, cols / 2], even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 [rows, cols / 2] -> uint8 [rows, cols]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def quantize_w4(weight: torch.Tensor, group_size: int):
    """Round-to-nearest asymmetric int4 per group: (q uint8, scale f32, zero f32), w ~ (q-8)s + z."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15)
    zero = lo + 8 * scale  # (q - 8) * scale + zero == q * scale + lo
    return q.to(torch.uint8).reshape(rows, cols), scale, zero


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> torch.Tensor:
    """float32 [rows, cols] from packed nibbles and per-group scale / zero."""
    q = unpack_nibbles(qweight).float()
    rows, cols = q.shape
    q = q.reshape(rows, cols // group_size, group_size)
    w = (q - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(rows, cols)


def cpu_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4pack_cpu(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 dtype: torch.dtype = KERNEL_DTYPE):
    """The CPU kernel's operands: packed weight and [in / group, out_padded, 2] scale_and_zero."""
    rows = q.shape[0]
    pad = -rows % _N_TILE
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
        scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scale_and_zero = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, scale_and_zero


# Every row count of a layer that fits it (``_native_gemm``) runs the native GEMM over PyTorch's
# int4 layout (kernels/csrc/int4pack.c): up to 24 rows it multiplies the nibbles directly (the same
# arithmetic at every row count, so a row's result does not depend on its batch), beyond that each
# 64-row tile of the weight is dequantized to bfloat16 once per call and every row runs over it,
# where PyTorch's kernel dequantizes the weight again for every 4 rows.
# benchmarks/cpu_int4_prefill.py (the default model's 30 layers of projections, weights streamed
# from memory, 2-core AVX-512 BF16; results in benchmarks/results/cpu_int4_gemm), ms per pass,
# PyTorch's kernel / native: see the results file; at 512 rows 723 / 267 (unpacking to bfloat16 +
# one GEMM 348).

# Without the native GEMM (no AVX-512 BF16, or a weight whose rows are not a multiple of 64), from
# this many rows on the weight is unpacked to bfloat16 natively and multiplied in one GEMM:
# unpack + GEMM / PyTorch's int4 kernel = 1.05 at 64 rows, 0.72 at 128, 0.47 at 512.
DEQUANT_MIN_ROWS = 80

# PyTorch's CPU int4 kernel computes rows in blocks of 4, re-reading the weight for each block: 2 to
# 4 rows cost about what 4 do (measured on the default model, 2-core AVX-512: a step of 1 token
# 9.4 ms, 2 / 3 / 4 tokens 11.5 / 12.9 / 14.6). Where a layer has no native GEMM it serves fewer
# than DEQUANT_MIN_ROWS rows, and the speculator prices step sizes by this staircase.
ROW_TILE = 4


@functools.cache
def _unpacker():
    """The native unpacker of the CPU int4 layout (kernels/csrc/int4pack.c), as
    ``fn(packed_ptr, scale_and_zero_ptr, rows, cols, group, out_ptr)``, or None: not built here,
    or its reading of the layout disagrees with this PyTorch build's packing op. The layout's
    tiles are 64 rows where PyTorch runs its AVX-512 kernels and 32 on AVX2: both are tried, on
    two tiles and a tail of 16 rows, against the dequantization formula (once per process)."""
    import ctypes

    from soarllm.kernels import cpu_native

    lib = cpu_native.load("int4pack")
    if lib is None:
        return None
    native = lib.int4pack_to_bf16
    native.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    native.restype = None
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (144, 64), generator=g, dtype=torch.uint8)
    scales = torch.rand(144, 2, generator=g) + 0.5
    zeros = torch.randn(144, 2, generator=g)
    packed, scale_and_zero = int4pack_cpu(q, scales, zeros)
    sz = scale_and_zero.float()
    want = dequantize_w4(pack_nibbles(q), sz[..., 0].t(), sz[..., 1].t(), 32).to(torch.bfloat16)
    for tile_rows in (64, 32):
        fn = functools.partial(_call_unpacker, native, tile_rows)
        if torch.equal(_unpack(fn, packed, scale_and_zero, 32, 64), want):
            return fn
    import logging

    logging.getLogger(__name__).warning(
        "this PyTorch build packs int4 weights differently from what kernels/csrc/int4pack.c "
        "reads: prefill batches keep PyTorch's int4 kernel")
    return None


def _call_unpacker(native, tile_rows: int, packed_ptr, sz_ptr, rows, cols, group, out_ptr):
    native(packed_ptr, sz_ptr, rows, cols, group, tile_rows, out_ptr)


def _unpack(fn, packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int,
            in_features: int) -> torch.Tensor:
    rows = scale_and_zero.shape[1]
    out = torch.empty(rows, in_features, dtype=torch.bfloat16)
    fn(packed.data_ptr(), scale_and_zero.data_ptr(), rows, in_features, group_size,
       out.data_ptr())
    return out


def _random_w4(g: torch.Generator, rows: int, cols: int, group: int):
    """Random nibbles, scales and zeros of a [rows, cols] weight: what the native kernels'
    once-per-process self-checks multiply."""
    q = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    scales = torch.rand(rows, cols // group, generator=g) * 0.1 + 0.01
    zeros = torch.randn(rows, cols // group, generator=g) * 0.1
    return q, scales, zeros


def _fits_native_gemm(scale_and_zero: torch.Tensor) -> bool:
    """Whether a layer of PyTorch's CPU int4 layout suits the native GEMM: bfloat16 scales and
    zeros, output rows in whole 64-row tiles (the packing pads them to 16 only)."""
    return scale_and_zero.dtype == torch.bfloat16 and scale_and_zero.shape[1] % 64 == 0


def _native_gemm(scale_and_zero: torch.Tensor):
    """The native GEMM for a layer of PyTorch's CPU int4 layout, or None: the layer does not fit
    it, or it is not available here."""
    return _int4pack_gemm() if _fits_native_gemm(scale_and_zero) else None


@functools.cache
def _int4pack_gemm():
    """The native GEMM over PyTorch's CPU int4 layout (kernels/csrc/int4pack.c), or None: not
    built here, no AVX-512 BF16, or its result disagreeing with PyTorch's int4 kernel (checked
    once per process, on a few row counts and group sizes)."""
    import ctypes

    from soarllm.kernels import cpu_native

    lib = cpu_native.load("int4pack")
    if lib is None or not lib.int4pack_gemm_supported():
        return None
    fn = lib.int4pack_gemm_bf16
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64]
    fn.restype = None
    g = torch.Generator().manual_seed(0)
    for rows, cols, group, m in ((64, 64, 32, 5), (128, 192, 64, 13), (192, 256, 128, 7),
                                 (64, 128, 32, 1), (128, 64, 64, 2), (64, 256, 128, 3),
                                 (192, 128, 32, 4), (64, 64, 32, 30)):
        q, scales, zeros = _random_w4(g, rows, cols, group)
        packed, scale_and_zero = int4pack_cpu(q, scales, zeros)
        x = torch.randn(m, cols, generator=g).to(torch.bfloat16)
        want = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zero).float()
        got = _gemm(fn, x, packed, scale_and_zero, group).float()
        if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
            import logging

            logging.getLogger(__name__).warning(
                "the native int4 GEMM (kernels/csrc/int4pack.c) disagrees with PyTorch's int4 "
                "kernel here: batches of rows keep PyTorch's kernel")
            return None
    return fn


# Set by prepare_compiled() once soarllm::w4a16_int4pack is loaded; read while compiling.
_cpp_op_ready = False


@functools.cache
def _int4pack_cpp_op() -> bool:
    """Load ``soarllm::w4a16_int4pack`` (kernels/csrc/int4pack_op.cpp: the choice of
    ``_w4a16_rows`` in C++; built once per machine, ~20 s, then ~1 s per process); False where the
    native kernels failed their checks or the operator does not build. Compiled steps then call
    it without Python."""
    global _cpp_op_ready
    from soarllm.kernels import cpu_native

    if _int4pack_gemm() is None or _unpacker() is None:
        return False
    if not cpu_native.load_torch_ops("int4pack_op", "int4pack",
                                     (("SOAR_DEQUANT_MIN_ROWS", DEQUANT_MIN_ROWS),)):
        return False
    torch.library.register_fake(
        "soarllm::w4a16_int4pack",
        lambda x, packed, scale_and_zero, group_size: x.new_empty(x.shape[0],
                                                                  scale_and_zero.shape[1]))
    _cpp_op_ready = True
    return True


def _gemm(fn, x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor,
          group_size: int) -> torch.Tensor:
    rows = scale_and_zero.shape[1]
    out = torch.empty(x.shape[0], rows, dtype=torch.bfloat16)
    fn(x.data_ptr(), x.stride(0), packed.data_ptr(), scale_and_zero.data_ptr(), out.data_ptr(),
       out.stride(0), x.shape[0], rows, x.shape[1], group_size)
    return out


def _w4a16_rows(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x [M, K] bfloat16 -> [M, N padded]: the native GEMM where the layer fits it, else PyTorch's
    int4 kernel for a few rows and unpack + bfloat16 GEMM from DEQUANT_MIN_ROWS. An op of its own
    (``soarllm::w4a16_linear_cpu``) so that the compiled graph with a symbolic row count takes the
    branch at run time instead of guarding (and recompiling) on the count."""
    fn = _native_gemm(scale_and_zero)
    if fn is not None:
        return _gemm(fn, x, packed, scale_and_zero, group_size)
    # unpacking pays only where the bfloat16 GEMM is native: on AVX2 PyTorch emulates it, and
    # unpack + GEMM measured 3.9x slower than the int4 kernel at 128 rows
    # (benchmarks/cpu_int4_prefill.py, results/cpu_vnni/s18_avx2.json)
    usable = (x.shape[0] >= DEQUANT_MIN_ROWS and scale_and_zero.dtype == torch.bfloat16
              and cpu_has_native_bf16())
    fn = _unpacker() if usable else None
    if fn is None:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)
    return F.linear(x, _unpack(fn, packed, scale_and_zero, group_size, x.shape[1]))


define_op(
    "w4a16_linear_cpu",
    "(Tensor x, Tensor packed, Tensor scale_and_zero, int group_size) -> Tensor",
    _w4a16_rows,
    lambda x, packed, scale_and_zero, group_size: x.new_empty(x.shape[0], scale_and_zero.shape[1]),
)


def pack_soar4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """The layout of the AVX-512 BF16 kernel (kernels/csrc/int4_gemm.c): per 64 inputs of a row, 32
    bytes with input j in the low nibble of byte j and input 32 + j in its high nibble; and
    (scale, min) pairs [out, in / group, 2] in float16 (GGUF's own precision), w = q * scale + min."""
    rows, cols = q.shape
    q = q.to(torch.uint8).view(rows, cols // 64, 2, 32)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(rows, cols // 2).contiguous()
    scale_min = torch.stack([scales, zeros - 8 * scales], dim=-1).to(torch.float16).contiguous()
    return packed, scale_min


@functools.cache
def _soar4_kernel():
    """The native int4 GEMM (kernels/csrc/int4_gemm.c), or None: no compiler, a CPU without
    AVX-512 BF16, or its result disagreeing with the dequantize-then-matmul formula (checked once
    per process on a few odd shapes)."""
    import ctypes

    from soarllm.kernels import cpu_native

    lib = cpu_native.load("int4_gemm")
    if lib is None or not lib.int4_gemm_supported():
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.int4_gemm_bf16.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i32, i32, i32, i32]
    lib.int4_gemm_bf16.restype = None
    lib.int4_dequant_bf16.argtypes = [ptr, ptr, ptr, i32, i32, i32]
    lib.int4_dequant_bf16.restype = None
    g = torch.Generator().manual_seed(0)
    for rows, cols, group, m in ((7, 128, 32, 1), (9, 192, 64, 3), (13, 256, 128, 6)):
        q, scales, zeros = _random_w4(g, rows, cols, group)
        packed, scale_min = pack_soar4(q, scales, zeros)
        x = torch.randn(m, cols, generator=g).to(torch.bfloat16)
        sm = scale_min.float()
        w = (q.float().view(rows, -1, group) * sm[..., :1] + sm[..., 1:]).view(rows, cols)
        want = x.float() @ w.t()
        got = _soar4_call(lib, x, packed, scale_min, group).float()
        dense = _soar4_dense(lib, packed, scale_min, group).float()
        if not (torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
                and torch.allclose(dense, w, rtol=2**-8, atol=0)):
            import logging

            logging.getLogger(__name__).warning(
                "the native int4 GEMM (kernels/csrc/int4_gemm.c) disagrees with its formula "
                "here: W4A16 layers keep PyTorch's int4 kernel")
            return None
    _define_soar4_op()
    return lib


def _soar4_call(lib, x: torch.Tensor, packed: torch.Tensor, scale_min: torch.Tensor,
                group_size: int) -> torch.Tensor:
    rows, cols = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(x.shape[0], rows, dtype=torch.bfloat16)
    lib.int4_gemm_bf16(x.data_ptr(), x.stride(0), packed.data_ptr(), scale_min.data_ptr(),
                       out.data_ptr(), out.stride(0), x.shape[0], rows, cols, group_size)
    return out


def _soar4_dense(lib, packed: torch.Tensor, scale_min: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    rows, cols = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    lib.int4_dequant_bf16(packed.data_ptr(), scale_min.data_ptr(), out.data_ptr(), rows, cols,
                          group_size)
    return out


def _w4a16_soar4(x: torch.Tensor, packed: torch.Tensor, scale_min: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """x [M, K] bfloat16 (rows contiguous) -> [M, N] bfloat16: the native kernel for up to
    ``DEQUANT_MIN_ROWS`` rows, else the weight dequantized natively and one bfloat16 GEMM."""
    lib = _soar4_kernel()
    if x.shape[0] >= DEQUANT_MIN_ROWS:
        return F.linear(x, _soar4_dense(lib, packed, scale_min, group_size))
    return _soar4_call(lib, x, packed, scale_min, group_size)


def _define_soar4_op() -> None:
    """``soarllm::w4a16_soar4``: in C++ (kernels/csrc/int4_gemm_op.cpp) where it builds, so
    compiled code calls it without Python; else the Python implementation above."""
    from soarllm.kernels import cpu_native

    schema = "(Tensor x, Tensor packed, Tensor scale_min, int group_size) -> Tensor"

    def fake(x, packed, scale_min, group_size):
        return x.new_empty(x.shape[0], packed.shape[0])

    if cpu_native.load_torch_ops("int4_gemm_op", "int4_gemm",
                                 (("SOAR_DEQUANT_MIN_ROWS", DEQUANT_MIN_ROWS),)):
        torch.library.register_fake("soarllm::w4a16_soar4", fake)
    else:
        define_op("w4a16_soar4", schema, _w4a16_soar4, fake)


def w4a16_linear_soar4(x: torch.Tensor, packed: torch.Tensor, scale_min: torch.Tensor,
                       group_size: int) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    out = torch.ops.soarllm.w4a16_soar4(x2, packed, scale_min, group_size)
    return out.reshape(*lead, packed.shape[0]).to(x.dtype)


def int8_activations_by_default() -> bool:
    """Whether layers created with ``int8_activations`` get them here: the VNNI kernels
    (quant/vnni.py) run on this CPU and SOARLLM_W4A16_CPU does not say otherwise."""
    return cpu_layout_request() in ("auto", "vnni") and vnni.kernels() is not None


def cpu_layout_request() -> str:
    """SOARLLM_W4A16_CPU: ``auto`` (unset: int8 activations where the format computes that way,
    GGUF, and the CPU has AVX-512 VNNI or AVX2, quant/vnni.py; else PyTorch's layout), ``torch``,
    ``native`` (soarllm's bfloat16 layout) or ``vnni`` (int8 activations on every W4A16 layer;
    ``torch`` and ``native`` keep bfloat16 activations everywhere)."""
    value = os.environ.get("SOARLLM_W4A16_CPU", "auto").strip().lower()
    if value not in ("auto", "torch", "native", "vnni"):
        raise ConfigError(f"SOARLLM_W4A16_CPU={value!r}: use auto, torch, native or vnni")
    return value


def w4a16_linear_cpu(x: torch.Tensor, packed: torch.Tensor, scale_and_zero: torch.Tensor,
                     group_size: int, out_features: int) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(scale_and_zero.dtype).contiguous()
    if not torch.compiler.is_compiling():  # eager: the row count is known, no op needed
        out = _w4a16_rows(x2, packed, scale_and_zero, group_size)
    elif _cpp_op_ready:
        out = torch.ops.soarllm.w4a16_int4pack(x2, packed, scale_and_zero, group_size)
    else:
        out = torch.ops.soarllm.w4a16_linear_cpu(x2, packed, scale_and_zero, group_size)
    if out.shape[-1] != out_features:
        out = out[:, :out_features]
    return out.reshape(*lead, out_features).to(x.dtype)


class W4A16Method(QuantMethod):
    checkpoint_params = {"weight": "qweight", "bias": "bias"}

    def __init__(self, group_size: int = 32, int8_activations: bool = False):
        """``int8_activations``: on CPUs with AVX-512 VNNI or AVX2, multiply with the activations
        quantized to int8 per 32 inputs (the format's own arithmetic, as for GGUF) unless
        SOARLLM_W4A16_CPU says otherwise."""
        if group_size not in GROUP_SIZES:
            raise ConfigError(f"W4A16 group size {group_size} is not supported; use one of {GROUP_SIZES}")
        self.group_size = group_size
        self.int8_activations = int8_activations

    def describe(self) -> str:
        return f"W4A16 (group {self.group_size})"

    def create_weights(self, layer, in_features, out_features, bias, dtype):
        g = self.group_size
        if in_features % g:
            raise ConfigError(
                f"W4A16 group size {g} does not divide the layer's {in_features} inputs; "
                f"choose a group size that divides it (one of {GROUP_SIZES})"
            )
        layer.qweight = set_weight_loader(
            new_param((out_features, in_features // 2), torch.uint8),
            functools.partial(self.load_weight, layer),
        )
        layer.scales = new_param((out_features, in_features // g), torch.float32)
        layer.zeros = new_param((out_features, in_features // g), torch.float32)
        layer.scales.filled_by = layer.zeros.filled_by = "qweight"
        layer.bias = (
            set_weight_loader(new_param((out_features,), dtype), functools.partial(load_rows, layer))
            if bias else None
        )
        layer.use_cpu_kernel = False
        layer.use_triton_kernel = False

    def load_weight(self, layer, param, loaded, shard_id=None) -> None:
        """Float weights are quantized (RTN); GGUF blocks of a 4-bit type are repacked exactly."""
        off, size = shard_range(layer, shard_id, layer.out_features)
        to_int4 = getattr(loaded, "to_int4", None)
        if to_int4 is not None:
            check_rows("weight", shard_id, (size, layer.in_features), loaded.shape)
            q, scale, zero = to_int4(self.group_size)
        else:
            weight = as_float(loaded)
            check_rows("weight", shard_id, (size, layer.in_features), weight.shape)
            q, scale, zero = quantize_w4(weight, self.group_size)
        self.store_rows(layer, off, q, scale, zero)

    @staticmethod
    def store_rows(layer, off: int, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """Rows off.. of the loading layout: nibbles packed, float32 scales and zeros."""
        size = q.shape[0]
        layer.qweight.data[off : off + size] = pack_nibbles(q)
        layer.scales.data[off : off + size] = scale
        layer.zeros.data[off : off + size] = zero

    def process_weights_after_loading(self, layer) -> None:
        if layer.qweight.device.type == "cuda" and triton_available():
            from soarllm.kernels.triton import quant_gemm

            q = unpack_nibbles(layer.qweight.data)
            packed, scales, zeros = quant_gemm.pack_w4(
                q, layer.scales.data, layer.zeros.data, self.group_size,
                quant_gemm.w4_scale_dtype(layer.params_dtype),
            )
            layer.qweight = nn.Parameter(packed, requires_grad=False)
            layer.scales = nn.Parameter(scales, requires_grad=False)
            layer.zeros = nn.Parameter(zeros, requires_grad=False)
            layer.use_triton_kernel = True
        elif layer.qweight.device.type == "cpu" and cpu_kernel_available():
            layout = self.cpu_layout(layer)
            q = unpack_nibbles(layer.qweight.data)
            if layout == "vnni4":
                scales_name = "scale_min"
                per_chunk = self.group_size // 32
                scale = layer.scales.data.repeat_interleave(per_chunk, 1)
                low = (layer.zeros.data - 8 * layer.scales.data).repeat_interleave(per_chunk, 1)
                packed, scales = vnni.pack_vnni4(q, scale, low)
            else:
                pack, scales_name = ((pack_soar4, "scale_min") if layout == "soar4"
                                     else (int4pack_cpu, "scale_and_zero"))
                packed, scales = pack(q, layer.scales.data, layer.zeros.data)
            layer.qweight = nn.Parameter(packed, requires_grad=False)
            setattr(layer, scales_name, nn.Parameter(scales, requires_grad=False))
            del layer.scales, layer.zeros
            layer.use_cpu_kernel = True
            layer.cpu_layout = layout
            if layout == "int4pack" and _native_gemm(scales) is None:  # see ROW_TILE
                layer.row_tile = (ROW_TILE, DEQUANT_MIN_ROWS)

    def cpu_layout(self, layer) -> str:
        """The CPU layout and kernel of the layer: ``vnni4`` (int8 activations, where asked for
        and possible), ``soar4`` (soarllm's bfloat16 kernel, where asked for), else ``int4pack``
        (PyTorch's layout, soarllm's or PyTorch's GEMM)."""
        request, width = cpu_layout_request(), self.weight_width(layer)
        if ((request == "vnni" or (request == "auto" and self.int8_activations))
                and width % 32 == 0 and int8_activations_by_default()):
            return "vnni4"
        if request == "native" and width % 64 == 0 and _soar4_kernel() is not None:
            return "soar4"
        return "int4pack"

    def prepare_compiled(self, layer) -> None:
        """Before the model step is compiled: CPU layers of PyTorch's layout get their row-count
        dispatch as a C++ operator (``_int4pack_cpp_op``)."""
        if layer.use_cpu_kernel and layer.cpu_layout == "int4pack":
            _int4pack_cpp_op()

    def apply(self, layer, x):
        if layer.use_triton_kernel:
            from soarllm.kernels.triton import quant_gemm

            return quant_gemm.w4a16_gemm(x, layer.qweight, layer.scales, layer.zeros,
                                         self.group_size, layer.bias)
        if layer.use_cpu_kernel:
            if layer.cpu_layout == "vnni4":
                out = vnni.linear(x, layer.qweight, layer.scale_min, layer.out_features)
            elif layer.cpu_layout == "soar4":
                out = w4a16_linear_soar4(x, layer.qweight, layer.scale_min, self.group_size)
            else:
                out = w4a16_linear_cpu(x, layer.qweight, layer.scale_and_zero, self.group_size,
                                       layer.out_features)
            return out if layer.bias is None else out + layer.bias
        w = dequantize_w4(layer.qweight, layer.scales, layer.zeros, self.group_size)
        return F.linear(x, w.to(x.dtype), layer.bias)

    def weight_width(self, layer) -> int:
        """Input columns of the stored weight (the layer's inputs; more for a layout that
        stores several planes side by side)."""
        return layer.in_features

    def dequantized_weight(self, layer) -> torch.Tensor:
        """The float32 weight the layer computes with (for tests and comparisons)."""
        if layer.use_triton_kernel:
            from soarllm.kernels.triton import quant_gemm

            return quant_gemm.unpack_w4(layer.qweight, layer.scales, layer.zeros, self.group_size,
                                        self.weight_width(layer))
        if not layer.use_cpu_kernel:
            return dequantize_w4(layer.qweight, layer.scales, layer.zeros, self.group_size)
        if layer.cpu_layout == "vnni4":  # the weight; the kernel also rounds the activations
            return vnni.unpack(layer.qweight, layer.scale_min, layer.out_features)
        if layer.cpu_layout == "soar4":
            return _soar4_dense(_soar4_kernel(), layer.qweight, layer.scale_min,
                                self.group_size).float()
        # Multiplying the identity recovers the weight as the kernel sees it (in bfloat16).
        eye = torch.eye(self.weight_width(layer), dtype=KERNEL_DTYPE)
        out = w4a16_linear_cpu(eye, layer.qweight, layer.scale_and_zero, self.group_size,
                               layer.out_features)
        return out.float().t().contiguous()
