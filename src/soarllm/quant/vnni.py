"""Integer GEMMs with int8 activations on CPUs with AVX-512 VNNI or AVX2 (kernels/csrc/vnni_gemm.c).

Each activation row is quantized to int8 per 32 inputs (xs = max|x| / 127, round to nearest) and
multiplied with unsigned 4-bit or 8-bit weights in integers (vpdpbusd; on AVX2 vpmaddubsw and
vpmaddwd, as llama.cpp's AVX2 dot products), the float32 scales applied
per chunk of 32: how llama.cpp computes its Q4_0 / Q4_1 / Q4_K (against Q8_1 activations) and
Q8_0 (against Q8_0) layers. 1.3-1.5x the bfloat16 int4 kernel from 16 to 128 rows,
about even at 1 (benchmarks/cpu_int4_prefill.py, results in benchmarks/results/cpu_vnni); the perplexity it
costs the default model is tested (tests/quant/test_default_model.py). Both layouts keep the
output rows in tiles of 16 (the 16 int32 lanes of one vpdpbusd) with per-chunk float16 scales
and mins, w = q * scale + min:

    4-bit  packed [N/16, K/32, 4, 64]: in chunk g of tile t, vector z (0..3) holds row l's inputs
           32g + 4z + e (low nibbles) and 32g + 16 + 4z + e (high nibbles) at byte 4l + e
    8-bit  packed [N/16, K/32, 8, 64]: vector z (0..7) holds row l's input 32g + 4z + e at 4l + e
    scale_min [N/16, K/32, 2, 16] float16: per tile and chunk the 16 rows' scales, then mins

quant/w4a16.py serves W4A16 layers through the 4-bit form (GGUF's by default, others when
SOARLLM_W4A16_CPU=vnni); quant/gguf.py serves Q8_0 layers through the 8-bit form. The name
"VNNI" stays with the layouts (vpdpbusd's operand order); ``isa()`` says which instructions run.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from soarllm.kernels.ops import define_op

logger = logging.getLogger(__name__)

_TILE, _CHUNK = 16, 32


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, rows - t.shape[0]))


def _pack_scale_min(scale: torch.Tensor, low: torch.Tensor, padded: int) -> torch.Tensor:
    """[N, K/32] float scale and min -> [N/16, K/32, 2, 16] float16."""
    s = _pad_rows(scale.float(), padded).view(padded // _TILE, _TILE, -1)
    m = _pad_rows(low.float(), padded).view(padded // _TILE, _TILE, -1)
    return torch.stack([s, m], 1).permute(0, 3, 1, 2).contiguous().to(torch.float16)


def pack_vnni4(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor):
    """q [N, K] in [0, 16), scale and low [N, K/32] (w = q * scale + low) -> the 4-bit layout."""
    rows, cols = q.shape
    padded = -(-rows // _TILE) * _TILE
    v = _pad_rows(q.to(torch.uint8), padded).view(padded // _TILE, _TILE, cols // _CHUNK, 2, 4, 4)
    packed = (v[:, :, :, 0] | (v[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4).contiguous()
    return packed.view(padded // _TILE, cols // _CHUNK, 4, 64), _pack_scale_min(scale, low, padded)


def pack_vnni8(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor):
    """q [N, K] in [0, 256), scale and low [N, K/32] (w = q * scale + low) -> the 8-bit layout."""
    rows, cols = q.shape
    padded = -(-rows // _TILE) * _TILE
    v = _pad_rows(q.to(torch.uint8), padded).view(padded // _TILE, _TILE, cols // _CHUNK, 8, 4)
    packed = v.permute(0, 2, 3, 1, 4).contiguous().view(padded // _TILE, cols // _CHUNK, 8, 64)
    return packed, _pack_scale_min(scale, low, padded)


def unpack(packed: torch.Tensor, scale_min: torch.Tensor, out_features: int) -> torch.Tensor:
    """The float32 weight [out_features, K] a 4-bit or 8-bit layout holds."""
    tiles, chunks, vectors = packed.shape[:3]
    b = packed.view(tiles, chunks, vectors, _TILE, 4).permute(0, 3, 1, 2, 4)  # tile row chunk z e
    if vectors == 4:
        b = torch.stack([b & 0xF, b >> 4], dim=3)  # low nibbles: inputs 4z.., high: 16 + 4z..
    q = b.reshape(tiles * _TILE, chunks, _CHUNK).float()
    sm = scale_min.float().permute(0, 3, 1, 2).reshape(tiles * _TILE, chunks, 2)
    w = q * sm[..., :1] + sm[..., 1:]
    return w.reshape(tiles * _TILE, chunks * _CHUNK)[:out_features]


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
              low: torch.Tensor) -> torch.Tensor:
    """The kernels' arithmetic in PyTorch (float32 out): x [M, K] quantized per 32 inputs to
    int8, q [N, K] the unsigned weights, scale and low [N, K/32] (w = q * scale + low)."""
    m, k = x.shape
    xf = x.float().view(m, k // _CHUNK, _CHUNK)
    amax = xf.abs().amax(-1, keepdim=True)
    xs = amax / 127
    xq = torch.where(amax > 0, torch.round(xf * (127 / amax)), torch.zeros_like(xf))
    qf = q.float().view(q.shape[0], k // _CHUNK, _CHUNK)
    dots = torch.einsum("mcj,ncj->mnc", xq, qf)  # exact: integers below 2**24
    return (dots * scale.float()[None] * xs[None, ..., 0].transpose(0, 1)
            + low.float()[None] * (xs[..., 0] * xq.sum(-1))[:, None, :]).sum(-1)


ISAS = {1: "AVX-512 VNNI", 2: "AVX2"}


def isa() -> str | None:
    """The instruction set the kernels run on here ("AVX-512 VNNI" or "AVX2"), or None."""
    lib = kernels()
    return None if lib is None else ISAS.get(lib.vnni_gemm_supported())


@functools.cache
def kernels():
    """The VNNI-layout GEMMs (kernels/csrc/vnni_gemm.c), or None: no compiler, a CPU with neither
    AVX-512 VNNI nor AVX2, or a result disagreeing with ``reference`` (checked once per process on
    a few odd shapes and row counts of both widths)."""
    import ctypes

    from soarllm.kernels import cpu_native

    lib = cpu_native.load("vnni_gemm")
    if lib is None or not lib.vnni_gemm_supported():
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for fn in (lib.int4_vnni_gemm, lib.int8_vnni_gemm):
        fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i32, i32, i32]
        fn.restype = None
    g = torch.Generator().manual_seed(0)
    for bits, rows, cols, m in ((4, 7, 64, 1), (4, 40, 192, 6), (8, 70, 256, 11), (8, 16, 96, 5)):
        q = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
        scale = torch.rand(rows, cols // _CHUNK, generator=g) * 0.01 + 0.001
        low = -torch.rand(rows, cols // _CHUNK, generator=g) * 2**bits * 0.005
        packed, scale_min = (pack_vnni4 if bits == 4 else pack_vnni8)(q, scale, low)
        x = torch.randn(m, cols, generator=g).to(torch.bfloat16)
        sm = scale_min.float().permute(0, 3, 1, 2).reshape(-1, cols // _CHUNK, 2)[:rows]
        want = reference(x, q, sm[..., 0], sm[..., 1])
        got = _call(lib, x, packed, scale_min, rows).float()
        if not torch.allclose(got, want, rtol=2**-7, atol=2**-7 * want.abs().max().item()):
            logger.warning("the VNNI GEMM (kernels/csrc/vnni_gemm.c) disagrees with its formula "
                           "here: layers keep bfloat16 activations")
            return None
    _define_ops(lib)
    return lib


def _call(lib, x: torch.Tensor, packed: torch.Tensor, scale_min: torch.Tensor,
          out_features: int) -> torch.Tensor:
    # the C++ operator's checks (kernels/csrc/vnni_gemm_op.cpp): the kernel trusts its shapes
    tiles, chunks, vectors = packed.shape[:3]
    if not (x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1
            and x.device.type == "cpu"):
        raise ValueError("VNNI GEMM: x must be a bfloat16 CPU tensor [M, K] with contiguous rows")
    if (packed.dim() != 4 or vectors not in (4, 8) or not packed.is_contiguous()
            or x.shape[1] != chunks * _CHUNK or out_features > tiles * _TILE
            or scale_min.dtype != torch.float16 or not scale_min.is_contiguous()
            or tuple(scale_min.shape) != (tiles, chunks, 2, _TILE)):
        raise ValueError(f"VNNI GEMM: x {tuple(x.shape)}, packed {tuple(packed.shape)}, scale_min "
                         f"{tuple(scale_min.shape)}, {out_features} outputs do not fit together")
    out = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
    if x.shape[0]:
        gemm = lib.int4_vnni_gemm if packed.shape[2] == 4 else lib.int8_vnni_gemm
        gemm(x.data_ptr(), x.stride(0), packed.data_ptr(), scale_min.data_ptr(), out.data_ptr(),
             out.stride(0), x.shape[0], out_features, packed.shape[1] * _CHUNK)
    return out


def _define_ops(lib) -> None:
    """``soarllm::w4a8_vnni4`` and ``soarllm::w8a8_vnni8``: in C++ (kernels/csrc/
    vnni_gemm_op.cpp) where it builds, so compiled code calls them without Python; else Python
    implementations over the same kernels."""
    from soarllm.kernels import cpu_native

    def fake(x, packed, scale_min, out_features):
        return x.new_empty(x.shape[0], out_features)

    built = cpu_native.load_torch_ops("vnni_gemm_op", "vnni_gemm")
    for name in ("w4a8_vnni4", "w8a8_vnni8"):
        if built:
            torch.library.register_fake(f"soarllm::{name}", fake)
        else:
            define_op(name, "(Tensor x, Tensor packed, Tensor scale_min, int out_features) -> Tensor",
                      functools.partial(_call, lib), fake)


def linear(x: torch.Tensor, packed: torch.Tensor, scale_min: torch.Tensor,
           out_features: int) -> torch.Tensor:
    """x [..., K] (any float dtype) @ the layout's weight.T -> [..., out_features] in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    op = torch.ops.soarllm.w4a8_vnni4 if packed.shape[2] == 4 else torch.ops.soarllm.w8a8_vnni8
    return op(x2, packed, scale_min, out_features).reshape(*lead, out_features).to(x.dtype)
