"""Weight-only quantized GEMV/GEMM Triton kernels (W8A16, W4A16) against float64 matmuls.

Two oracles per case: the quant modules' own quantize + dequantize functions (quant/w8a16.py,
quant/w4a16.py), and a dequantization written here from the formats' definitions
(w = q * scale; w = (q - 8) * scale + zero per group). For 16-bit models the CUDA W4 layout stores
scale and zero in bfloat16, so the second oracle rounds them the same way and the
first one gets a tolerance for that rounding. Shapes cover K and N off the kernels' blocks,
M in {1, 3, 17, 64} (GEMV, small-batch and tiled tl.dot paths) and K long enough to split.

On a machine without CUDA the kernels run in Triton's interpreter with small shapes; on a GPU the
same tests run on CUDA, plus Llama-3-8B layer shapes through the quantized Linear layers.
"""

from __future__ import annotations

import pytest
import torch

from soarllm.kernels.triton_utils import interpreter_enabled, triton_available
from soarllm.quant.w4a16 import dequantize_w4, pack_nibbles, quantize_w4
from soarllm.quant.w8a16 import dequantize_w8, quantize_w8

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available() or not (CUDA or interpreter_enabled()),
    reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1 on CPU)",
)
MS = [1, 3, 17, 64]
# error allowed relative to the rms of the exact output: output rounding plus, on the tl.dot path,
# the dequantized weight rounded to the activation dtype (the interpreter truncates bfloat16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-5, torch.float16: 2.0**-8}


def _check(got: torch.Tensor, want: torch.Tensor, tol: float):
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape
    scale = want.pow(2).mean().sqrt()
    err = (got - want).abs()
    bound = tol * (want.abs() + scale)
    assert bool((err <= bound).all()), f"max error {err.max():.3g} (rms of output {scale:.3g})"


def _w4_dequant_here(q, scale, zero, group, rounded_to=None):
    """float64 [N, K] from unpacked values and per-group scale and zero: (q - 8) * scale + zero,
    scale and zero first rounded to ``rounded_to`` where given (as the CUDA layout stores them)."""
    if rounded_to is not None:
        scale, zero = scale.to(rounded_to), zero.to(rounded_to)
    s = scale.double().repeat_interleave(group, dim=1)
    z = zero.double().repeat_interleave(group, dim=1)
    return (q.double() - 8) * s + z


W4_CASES = [  # (N, K, group): N and K off the 128 blocks; K of 1024 splits
    (72, 96, 32),
    (200, 320, 64),
    (130, 384, 128),
    (40, 1024, 128),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,group", W4_CASES)
def test_w4a16_gemm(dtype, n, k, group):
    from soarllm.kernels.triton import quant_gemm

    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    q, scale, zero = quantize_w4(w, group)
    sdt = quant_gemm.w4_scale_dtype(dtype)
    packed = [t.to(DEVICE) for t in quant_gemm.pack_w4(q, scale, zero, group, sdt)]
    module_w = dequantize_w4(pack_nibbles(q), scale, zero, group).double()  # the module's oracle
    here_w = _w4_dequant_here(q, scale, zero, group, None if sdt == torch.float32 else sdt)
    assert torch.allclose(_w4_dequant_here(q, scale, zero, group), module_w, atol=1e-6)
    for m in MS:
        x = torch.randn(m, k, generator=g).to(dtype)
        y = quant_gemm.w4a16_gemm(x.to(DEVICE), *packed, group)
        assert y.dtype == dtype and y.shape == (m, n)
        _check(y, x.double() @ here_w.t(), TOL[dtype])
        # the module's exact float32 scales: bfloat16 scales and zeros add ~2**-8 relative error
        _check(y, x.double() @ module_w.t(), max(TOL[dtype], 2.0**-5 if sdt != torch.float32 else 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,group", W4_CASES)
def test_w4_dot_kernel(dtype, n, k, group):
    """The tensor-core W4 kernel (exact q - 8 planes, scale and zero per group; on a GPU the PTX
    dequantization) at every batch size, its split-K partials added by a second kernel or by the
    last program of each tile (whose tickets are all reset afterwards), and the
    dequantize-then-GEMM path of large batches."""
    from soarllm.kernels.triton import quant_gemm

    g = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=g) * 0.05
    q, scale, zero = quantize_w4(w, group)
    sdt = quant_gemm.w4_scale_dtype(dtype)
    packed = [t.to(DEVICE) for t in quant_gemm.pack_w4(q, scale, zero, group, sdt)]
    here_w = _w4_dequant_here(q, scale, zero, group, None if sdt == torch.float32 else sdt)
    for m in MS:
        x = torch.randn(m, k, generator=g).to(dtype)
        for block_m in (16, 64) if m > 16 else (16,):
            out = torch.empty((m, n), dtype=dtype, device=DEVICE)
            y = quant_gemm.w4_dot(x.to(DEVICE), *packed, group, out, block_m=block_m, per_sm=8)
            _check(y, x.double() @ here_w.t(), TOL[dtype])
        if m == 17:  # x summed in registers and reduced once per group, not by a product
            out = torch.empty((m, n), dtype=dtype, device=DEVICE)
            y = quant_gemm.w4_dot(x.to(DEVICE), *packed, group, out, xsum_dot=False)
            _check(y, x.double() @ here_w.t(), TOL[dtype])
        for _ in range(2 if m == 3 else 0):  # the second launch reuses the reset tickets
            out = torch.empty((m, n), dtype=dtype, device=DEVICE)
            y = quant_gemm.w4_dot(x.to(DEVICE), *packed, group, out, per_sm=8, fused_reduce=True)
            _check(y, x.double() @ here_w.t(), TOL[dtype])
    for tickets in quant_gemm._TICKETS.values():  # every fused launch reset what it used
        assert int(tickets.abs().sum()) == 0
        out = torch.empty((m, n), dtype=dtype, device=DEVICE)
        y = quant_gemm.w4_dequant_mm(x.to(DEVICE), *packed, group, out)
        _check(y, x.double() @ here_w.t(), TOL[dtype])


def test_w4_tuning_table(tmp_path, monkeypatch):
    """SOARLLM_W4A16_TUNING replaces the kernel choice per batch bucket; float32 keeps the float32
    kernels; a GEMV entry never serves M > 1."""
    import json

    from soarllm.kernels.triton import quant_gemm

    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"1": {"kernel": "dot", "block_n": 128},
                                "16": {"kernel": "gemv"}, "1073741824": {"kernel": "dequant"}}))
    monkeypatch.setenv("SOARLLM_W4A16_TUNING", str(path))
    quant_gemm._w4_tuning.cache_clear()
    try:
        assert quant_gemm.w4_config(1, torch.bfloat16) == {"kernel": "dot", "block_n": 128}
        assert quant_gemm.w4_config(8, torch.bfloat16) == {"kernel": "dot"}  # a GEMV: M = 1 only
        assert quant_gemm.w4_config(300, torch.float16) == {"kernel": "dequant"}
        assert quant_gemm.w4_config(1, torch.float32) == {"kernel": "gemv"}
        w = torch.randn(40, 256) * 0.05
        q, scale, zero = quantize_w4(w, 32)
        packed = [t.to(DEVICE) for t in quant_gemm.pack_w4(q, scale, zero, 32, torch.bfloat16)]
        x = torch.randn(1, 256).bfloat16()
        y = quant_gemm.w4a16_gemm(x.to(DEVICE), *packed, 32)
        want = x.double() @ _w4_dequant_here(q, scale, zero, 32, torch.bfloat16).t()
        _check(y, want, TOL[torch.bfloat16])
    finally:
        monkeypatch.delenv("SOARLLM_W4A16_TUNING")
        quant_gemm._w4_tuning.cache_clear()


def test_w4_layout_round_trip():
    """unpack_w4 (the layer's dequantized_weight on CUDA) inverts pack_w4, padding dropped."""
    from soarllm.kernels.triton import quant_gemm

    w = torch.randn(33, 160)
    q, scale, zero = quantize_w4(w, 32)
    packed = quant_gemm.pack_w4(q, scale, zero, 32, torch.float32)
    assert packed[0].dtype == torch.int32 and packed[0].shape == (256 // 8, 33)
    back = quant_gemm.unpack_w4(*packed, 32, 160)
    torch.testing.assert_close(back.double(), _w4_dequant_here(q, scale, zero, 32), rtol=0,
                               atol=1e-6)


W8_CASES = [(72, 96), (130, 100), (40, 1000), (257, 64)]  # K of 1000 splits, with a tail


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", W8_CASES)
def test_w8a16_gemm(dtype, n, k):
    from soarllm.kernels.triton import quant_gemm

    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 0.05
    q, scale = quantize_w8(w)
    here_w = q.double() * scale.double()[:, None]
    module_w = dequantize_w8(q, scale).double()
    qt = quant_gemm.pack_w8(q).to(DEVICE)
    assert qt.shape == (k, n) and qt.dtype == torch.int8
    bias = torch.randn(n, generator=g).to(dtype)
    for m in MS:
        x = torch.randn(m, k, generator=g).to(dtype)
        y = quant_gemm.w8a16_gemm(x.to(DEVICE), qt, scale.to(DEVICE))
        assert y.dtype == dtype and y.shape == (m, n)
        _check(y, x.double() @ here_w.t(), TOL[dtype])
        _check(y, x.double() @ module_w.t(), TOL[dtype])
    yb = quant_gemm.w8a16_gemm(x.to(DEVICE), qt, scale.to(DEVICE), bias.to(DEVICE))
    _check(yb, x.double() @ here_w.t() + bias.double(), 2 * TOL[dtype])


def test_leading_dims_and_strided_rows():
    """[B, T, K] inputs flatten to rows; a row-strided view (a slice of a wider tensor) works."""
    from soarllm.kernels.triton import quant_gemm

    w = torch.randn(48, 128) * 0.05
    q, scale, zero = quantize_w4(w, 32)
    packed = [t.to(DEVICE) for t in quant_gemm.pack_w4(q, scale, zero, 32, torch.float32)]
    wide = torch.randn(2, 3, 200)
    x = wide[..., :128]
    y = quant_gemm.w4a16_gemm(x.to(DEVICE), *packed, 32)
    assert y.shape == (2, 3, 48)
    want = x.double() @ _w4_dequant_here(q, scale, zero, 32).t()
    _check(y, want, TOL[torch.float32])


# ------------------------------------------------------------------------------- GPU, real shapes

LLAMA3_8B = [(4096, 6144), (4096, 28672), (14336, 4096), (4096, 4096)]  # (K, N)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["w4a16-g32", "w4a16-g128", "w8a16"])
@pytest.mark.parametrize("k,n", LLAMA3_8B)
def test_quantized_linear_layers_on_cuda_llama3_shapes(scheme, k, n):
    """The quantized Linear on CUDA (Triton layout) against x @ its own dequantized weight."""
    from soarllm.model.layers.linear import Linear
    from soarllm.quant.w4a16 import W4A16Method
    from soarllm.quant.w8a16 import W8A16Method

    method = W8A16Method() if scheme == "w8a16" else W4A16Method(int(scheme.rsplit("g", 1)[1]))
    with torch.device("cuda"):
        layer = Linear(k, n, dtype=torch.bfloat16, quant_method=method)
    w = torch.randn(n, k, device="cuda") * 0.02
    layer.qweight.weight_loader(layer.qweight, w)
    method.process_weights_after_loading(layer)
    assert layer.use_triton_kernel
    dense = method.dequantized_weight(layer).double()
    assert (dense - w.double()).abs().max() < 0.02  # the quantization itself is sane
    for m in (1, 4, 16, 100):
        x = torch.randn(m, k, device="cuda").bfloat16()
        _check(layer(x), x.double() @ dense.t(), 2.0**-6)


def _compile_w4_for_hopper() -> list[tuple[str, int]]:
    """The W4 tensor-core kernel (with its inline PTX, both x-sum forms, the fused split-K
    reduction) and the dequantization kernel, compiled for sm_90: (name, shared memory bytes)."""
    from soarllm.kernels.triton import quant_gemm as qg
    from tests.kernels.sm90 import compile_sm90

    out = []
    for dt, block_m, block_n, group, fused in (("bf16", 16, 128, 128, False),
                                               ("fp16", 32, 256, 32, True)):
        types = dict(x_ptr=f"*{dt}", qw_ptr="*i32", s_ptr=f"*{dt}", z_ptr=f"*{dt}",
                     out_ptr="*fp32" if fused else f"*{dt}", final_ptr=f"*{dt}",
                     tickets_ptr="*i32")
        out.append(compile_sm90(qg._w4_dot_kernel, types,
                                dict(GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, ASM=True,
                                     FUSED_REDUCE=fused, XSUM_DOT=not fused,
                                     DOT_PRECISION="tf32"),
                                ["x_ptr", "qw_ptr", "s_ptr", "z_ptr", "out_ptr", "final_ptr", "N",
                                 "K", "stride_xm"]))
    out.append(compile_sm90(qg._w4_dequant_kernel,
                            dict(qw_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", wt_ptr="*bf16"),
                            dict(GROUP=128, BLOCK_N=128),
                            ["qw_ptr", "s_ptr", "z_ptr", "wt_ptr", "N"]))
    return out


@pytest.mark.skipif(CUDA, reason="a GPU runs the kernels themselves")
def test_w4_kernels_compile_for_hopper(tmp_path):
    """The interpreter never sees the inline PTX: compile it for an H100 (sm_90) on this machine,
    so that an assembler error fails here and not only on a GPU."""
    from tests.kernels.sm90 import H100_SHARED_BYTES, compiled_in_child

    built = compiled_in_child("tests.kernels.test_triton_quant_gemm:_compile_w4_for_hopper",
                              tmp_path)
    assert len(built) == 3
    assert all(shared <= H100_SHARED_BYTES for _, shared in built)
