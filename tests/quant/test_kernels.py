"""W8A16 and W4A16 linear layers against a dequantize-then-matmul oracle written here in plain
float32 torch: random shapes (odd output sizes, several group sizes), float32 and bfloat16
activations, the CPU kernels and the portable fallback, merged shards loading through their
weight_loader.

The CPU kernels run in bfloat16 whatever the model dtype (their float32 paths are scalar loops),
so the oracle rounds the activations and the scales / zeros to bfloat16 as the kernel's inputs,
and computes in float32; the kernel's output is bfloat16 (8 significant bits)."""

from __future__ import annotations

import pytest
import torch

from soarllm.errors import ConfigError
from soarllm.model.layers.linear import Linear, MergedLinear
from soarllm.quant.config import RTNConfig, parse_quantization
from soarllm.quant.w4a16 import (
    DEQUANT_MIN_ROWS,
    ROW_TILE,
    W4A16Method,
    _soar4_kernel,
    quantize_w4,
    unpack_nibbles,
)
from soarllm.quant.w8a16 import DEQUANT_MIN_ROWS as W8_DEQUANT_MIN_ROWS
from soarllm.quant.w8a16 import W8A16Method, quantize_w8

# (out, in): odd and non-multiple-of-16 output sizes pad to the int4 kernel's tile of 16
# rows padded to 16 by the packing; (64, 64) and (192, 384) are whole 64-row tiles, where the
# native GEMM over PyTorch's layout serves 5 rows and more
SHAPES = [(16, 64), (48, 128), (7, 64), (100, 256), (200, 384), (24, 96), (64, 64), (192, 384)]
DTYPES = [torch.float32, torch.bfloat16]


def _oracle_w4(layer_q, scales, zeros, group):
    """w = (q - 8) * scale + zero, per group of `group` inputs: the tinygemm convention."""
    q = layer_q.float()
    rows, cols = q.shape
    s = scales.float().repeat_interleave(group, dim=1)
    z = zeros.float().repeat_interleave(group, dim=1)
    assert s.shape == (rows, cols)
    return (q - 8) * s + z


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the kernel sees of a float32 scale (or zero) stored in the activation dtype."""
    return t.to(dtype).float()


BF16 = torch.bfloat16


def _close(got: torch.Tensor, want: torch.Tensor, exact_fp32: bool = False) -> None:
    scale = want.abs().max().item() + 1e-6
    err = (got.float() - want).abs().max().item()
    tol = 1e-5 if exact_fp32 else 2e-2  # bfloat16 output keeps 8 significant bits
    assert err <= tol * scale, f"max error {err:.3g} vs output scale {scale:.3g}"


def _w4_layer(out_f, in_f, group, dtype, weight, bias=None):
    layer = Linear(in_f, out_f, bias=bias is not None, dtype=dtype, quant_method=W4A16Method(group))
    layer.qweight.weight_loader(layer.qweight, weight)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias)
    q, s, z = unpack_nibbles(layer.qweight.data.clone()), layer.scales.data.clone(), layer.zeros.data.clone()
    layer.quant_method.process_weights_after_loading(layer)
    return layer, (q, s, z)


@pytest.mark.parametrize(
    ("shape", "group"), [(s, g) for s in SHAPES for g in (32, 64, 128) if s[1] % g == 0]
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["torch", "native"])
def test_w4a16_cpu_kernel_matches_dequantized_matmul(shape, group, dtype, layout, monkeypatch):
    monkeypatch.setenv("SOARLLM_W4A16_CPU", layout)
    out_f, in_f = shape
    torch.manual_seed(out_f * in_f + group)
    weight = torch.randn(out_f, in_f) * 0.05
    bias = torch.randn(out_f)
    layer, (q, s, z) = _w4_layer(out_f, in_f, group, dtype, weight, bias)
    assert layer.use_cpu_kernel
    # the native layout where the inputs come in blocks of 64 and the kernel builds here (AVX-512
    # BF16), PyTorch's int4 kernel otherwise
    native = layout == "native" and in_f % 64 == 0 and _soar4_kernel() is not None
    assert layer.cpu_layout == ("soar4" if native else "int4pack")
    # rows: 1-4 the native kernel's exact path, 5+ its dequantized tile, from DEQUANT_MIN_ROWS
    # on the weight unpacked to bfloat16 natively, then one GEMM
    for m in (1, 3, 4, 5, 17, DEQUANT_MIN_ROWS, DEQUANT_MIN_ROWS + 7):
        x = torch.randn(m, in_f).to(dtype)
        w = _oracle_w4(q, _rounded(s, BF16), _rounded(z, BF16), group)
        want = _rounded(x, BF16) @ w.t() + bias.to(dtype).float()
        with torch.inference_mode():
            got = layer(x)
        assert got.dtype == dtype and got.shape == (m, out_f)
        _close(got, want)


def test_the_native_gemm_serves_batches_of_rows_of_whole_tiles(monkeypatch):
    """A layer of whole 64-row tiles runs the native GEMM over PyTorch's int4 layout at every row
    count (kernels/csrc/int4pack.c: up to 24 rows its direct path, more over a dequantized tile),
    equal to the dequantized matmul; layers whose rows are not whole tiles keep PyTorch's
    kernel."""
    from soarllm.quant import w4a16

    if w4a16._int4pack_gemm() is None:
        pytest.skip("no AVX-512 BF16 here: the native GEMM is not built")
    calls = []
    real = w4a16._gemm
    monkeypatch.setattr(w4a16, "_gemm", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    torch.manual_seed(4)
    for out_f, in_f, group in ((128, 192, 64), (320, 128, 32), (64, 256, 128), (80, 128, 32)):
        layer, (q, s, z) = _w4_layer(out_f, in_f, group, BF16, torch.randn(out_f, in_f) * 0.05)
        w = _oracle_w4(q, _rounded(s, BF16), _rounded(z, BF16), group)
        for m in (1, 2, 3, 4, 5, 7, 12, 13, 24, 25, 40, DEQUANT_MIN_ROWS + 1):
            calls.clear()
            x = torch.randn(m, in_f).to(BF16)
            with torch.inference_mode():
                got = layer(x)
            _close(got, _rounded(x, BF16) @ w.t())
            whole_tiles = out_f % 64 == 0
            assert calls == ([m] if whole_tiles else []), (out_f, m)


def test_the_native_direct_path_gives_a_row_the_same_result_in_any_batch():
    """Up to 24 rows every row takes the same arithmetic (kernels/csrc/int4pack.c's direct path):
    a row's output does not depend on how many rows share the call, bit for bit, so a
    verification step computes what single-token decodes would."""
    from soarllm.quant import w4a16

    if w4a16._int4pack_gemm() is None:
        pytest.skip("no AVX-512 BF16 here: the native GEMM is not built")
    torch.manual_seed(6)
    q, s, z = quantize_w4(torch.randn(192, 320) * 0.05, 32)
    packed, sz = w4a16.int4pack_cpu(q, s, z)
    x = torch.randn(24, 320).to(BF16)
    alone = torch.cat([w4a16._w4a16_rows(x[i : i + 1], packed, sz, 32) for i in range(24)])
    for m in (2, 3, 4, 5, 9, 24):
        assert torch.equal(w4a16._w4a16_rows(x[:m], packed, sz, 32), alone[:m]), m


def test_the_cpp_row_dispatch_equals_the_python_one():
    """``soarllm::w4a16_int4pack`` (kernels/csrc/int4pack_op.cpp), what compiled steps call, picks
    the same kernel as the Python op for every row count: the same output bit for bit."""
    from soarllm.quant import w4a16

    if not w4a16._int4pack_cpp_op():
        pytest.skip("no AVX-512 BF16 here (or no C++ compiler): the native int4 kernels or the "
                    "C++ operator are not available")
    torch.manual_seed(5)
    for out_f, in_f in ((128, 192), (48, 128)):  # whole 64-row tiles, and not
        q, s, z = quantize_w4(torch.randn(out_f, in_f) * 0.05, 32)
        packed, sz = w4a16.int4pack_cpu(q, s, z)
        for m in (1, 3, 5, 9, DEQUANT_MIN_ROWS + 1):
            x = torch.randn(m, in_f).to(BF16)
            torch.testing.assert_close(torch.ops.soarllm.w4a16_int4pack(x, packed, sz, 32),
                                       torch.ops.soarllm.w4a16_linear_cpu(x, packed, sz, 32),
                                       rtol=0, atol=0)


def test_w4a16_cpu_rows_branch_at_run_time_under_compile():
    """Compiled with a symbolic row count, one graph serves few rows (the int4 kernel) and many
    (the native GEMM, or the unpacked weight's GEMM), all equal to the eager layer, without
    recompiling."""
    from soarllm.quant.w4a16 import _unpacker

    assert _unpacker() is not None  # this machine builds and checks the native unpacker
    torch.manual_seed(3)
    for rows in (48, 128):  # rows in whole 64-row tiles: the native GEMM
        layer, _ = _w4_layer(rows, 128, 32, BF16, torch.randn(rows, 128) * 0.05)
        _assert_one_graph_for(layer, (2, DEQUANT_MIN_ROWS + 3, 5, 3 * DEQUANT_MIN_ROWS))


def _assert_one_graph_for(layer, row_counts) -> None:
    """Compiled with a symbolic row count, the layer equals its eager self at every count, from
    one captured graph (no recompilation)."""
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=backend, dynamic=True, fullgraph=True)
    with torch.inference_mode():
        for m in row_counts:
            x = torch.randn(m, layer.in_features).to(BF16)
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    assert len(frames) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_fallback_equals_cpu_kernel(dtype):
    """The portable path (other devices) computes the same layer as the CPU kernel."""
    torch.manual_seed(1)
    weight = torch.randn(40, 128) * 0.1
    fast, _ = _w4_layer(40, 128, 32, dtype, weight)
    slow = Linear(128, 40, dtype=dtype, quant_method=W4A16Method(32))
    slow.qweight.weight_loader(slow.qweight, weight)
    slow.scales.data = slow.scales.data.to(BF16)  # as the kernel sees them
    slow.zeros.data = slow.zeros.data.to(BF16)
    assert not slow.use_cpu_kernel
    x = torch.randn(5, 128).to(dtype)
    with torch.inference_mode():
        _close(slow(x), fast(x).float())


def test_w4a16_rtn_error_is_within_half_a_step():
    torch.manual_seed(2)
    weight = torch.randn(24, 96)
    q, s, z = quantize_w4(weight, 32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    err = (_oracle_w4(q, s, z, 32) - weight).abs()
    step = s.repeat_interleave(32, dim=1)
    assert bool((err <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("shape", [(16, 64), (7, 96), (33, 256), (5, 40), (9, 65)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_w8a16_matches_dequantized_matmul(shape, dtype):
    """Input sizes that are multiples of 32 take _weight_int8pack_mm, others the fallback."""
    out_f, in_f = shape
    torch.manual_seed(out_f + in_f)
    weight = torch.randn(out_f, in_f) * 0.05
    layer = Linear(in_f, out_f, dtype=dtype, quant_method=W8A16Method())
    layer.qweight.weight_loader(layer.qweight, weight)
    q, s = layer.qweight.data.clone(), layer.scales.data.clone()
    layer.quant_method.process_weights_after_loading(layer)
    kernel = in_f % 32 == 0
    assert layer.use_cpu_kernel == kernel
    want_w = q.float() * (_rounded(s, BF16) if kernel else _rounded(s, dtype))[:, None]
    # the per-channel int8 error bound of round to nearest
    assert bool(((q.float() * s[:, None] - weight).abs() <= s[:, None] / 2 + 1e-7).all())
    # from W8_DEQUANT_MIN_ROWS rows the kernel path dequantizes to bfloat16 and runs one GEMM
    for m in (1, 4, W8_DEQUANT_MIN_ROWS, W8_DEQUANT_MIN_ROWS + 5):
        x = torch.randn(m, in_f).to(dtype)
        with torch.inference_mode():
            got = layer(x)
        assert got.dtype == dtype
        x_seen = _rounded(x, BF16) if kernel else x.float()
        w_seen = _rounded(want_w, BF16) if kernel and m >= W8_DEQUANT_MIN_ROWS else want_w
        _close(got, x_seen @ w_seen.t(), exact_fp32=not kernel and dtype == torch.float32)


def test_w8a16_cpu_rows_branch_at_run_time_under_compile():
    """Compiled with a symbolic row count, one graph serves few rows (the int8 kernel) and many
    (dequantize + GEMM), both equal to the eager layer, without recompiling."""
    torch.manual_seed(4)
    layer = Linear(128, 48, dtype=BF16, quant_method=W8A16Method())
    layer.qweight.weight_loader(layer.qweight, torch.randn(48, 128) * 0.05)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.use_cpu_kernel
    _assert_one_graph_for(layer, (2, W8_DEQUANT_MIN_ROWS + 3, 5, 2 * W8_DEQUANT_MIN_ROWS))


@pytest.mark.parametrize("method", [lambda: W8A16Method(), lambda: W4A16Method(32)])
def test_merged_shards_load_through_the_layer(method):
    """q/k/v shards loaded one by one equal the concatenated weight quantized at once."""
    torch.manual_seed(3)
    sizes = {"q": 64, "k": 32, "v": 32}
    shards = {name: torch.randn(n, 64) * 0.1 for name, n in sizes.items()}
    merged = MergedLinear(64, sizes, dtype=torch.float32, quant_method=method())
    for name in ("v", "q", "k"):  # any order
        merged.qweight.weight_loader(merged.qweight, shards[name], name)
    merged.quant_method.process_weights_after_loading(merged)
    whole = Linear(64, 128, dtype=torch.float32, quant_method=method())
    whole.qweight.weight_loader(whole.qweight, torch.cat([shards[n] for n in sizes]))
    whole.quant_method.process_weights_after_loading(whole)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(merged(x), whole(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shard 'k'"):
        merged2 = MergedLinear(64, sizes, dtype=torch.float32, quant_method=method())
        merged2.qweight.weight_loader(merged2.qweight, shards["q"], "k")


def test_quantization_argument_errors_name_the_fix():
    assert parse_quantization(None) is None
    assert parse_quantization("W4A16-G128") == "w4a16-g128"
    with pytest.raises(ConfigError, match="w8a16"):
        parse_quantization("int3")
    with pytest.raises(ConfigError, match="32, 64, 128"):
        parse_quantization("w4a16-g48")
    with pytest.raises(ConfigError, match="does not divide"):
        Linear(96, 16, quant_config=RTNConfig("w4a16", 64), prefix="x")


def test_rtn_config_leaves_lm_head_unquantized():
    config = RTNConfig("w4a16", 32)
    head = Linear(64, 16, quant_config=config, prefix="lm_head")
    proj = Linear(64, 16, quant_config=config, prefix="model.layers.0.mlp.down_proj")
    assert hasattr(head, "weight") and not hasattr(head, "qweight")
    assert isinstance(proj.quant_method, W4A16Method)
    assert "1 linear layers W4A16 (group 32)" in config.summary()


def test_w8a16_quantize_is_symmetric_per_row():
    w = torch.tensor([[127.0, -3.0, 10.2], [0.0, 0.0, 0.0]])
    q, s = quantize_w8(w)
    assert q[0].tolist() == [127, -3, 10] and s[0].item() == 1.0
    assert q[1].tolist() == [0, 0, 0]


def test_w4a16_native_operator_equals_its_python_fallback(monkeypatch):
    """``soarllm::w4a16_soar4`` runs in C++ where the extension builds; the Python implementation
    (used where it does not) computes the same output for the kernel's three paths."""
    from soarllm.quant import w4a16

    monkeypatch.setenv("SOARLLM_W4A16_CPU", "native")
    torch.manual_seed(4)
    layer, _ = _w4_layer(40, 192, 64, BF16, torch.randn(40, 192) * 0.05)
    if _soar4_kernel() is None:  # a CPU without AVX-512 BF16: PyTorch's layout, nothing to compare
        assert layer.cpu_layout == "int4pack"
        return
    for m in (1, 4, 9, DEQUANT_MIN_ROWS + 1):
        x = torch.randn(m, 192).to(BF16)
        want = w4a16._w4a16_soar4(x, layer.qweight, layer.scale_min, 64)
        got = torch.ops.soarllm.w4a16_soar4(x, layer.qweight, layer.scale_min, 64)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_engine_on_the_native_int4_layout_matches_pytorchs_int4_kernel(tmp_path, monkeypatch):
    """The whole model step on soarllm's int4 layout (batches of 1 to 9 decodes, prefill chunks)
    against the same W4A16 weights on PyTorch's int4 kernel: the same greedy tokens on most of
    the requests (bfloat16: the two kernels round differently), logprobs close."""
    from soarllm import LLM, SamplingParams
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", "llama")
    native = _soar4_kernel() is not None  # else (no AVX-512 BF16) both sides are PyTorch's
    prompts = [[3 + (7 * i + 5 * j) % 90 for j in range(4 + 9 * i)] for i in range(9)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    outs = {}
    for layout in ("torch", "native"):
        monkeypatch.setenv("SOARLLM_W4A16_CPU", layout)
        llm = LLM(str(model), dtype="bfloat16", quantization="w4a16", kv_cache_memory="32MiB",
                  block_size=4, enforce_eager=True)
        layers = [m for m in llm.llm_engine.executor.runner.model.modules()
                  if getattr(m, "cpu_layout", None)]
        assert layers and {m.cpu_layout for m in layers} == {
            "soar4" if layout == "native" and native else "int4pack"}
        # the speculator prices steps by the row blocks of PyTorch's kernel where that serves a
        # layer; soarllm's kernels (either layout) have none
        from soarllm.quant import w4a16

        torch_kernel = [m for m in layers if m.cpu_layout == "int4pack"
                        and w4a16._native_gemm(m.scale_and_zero) is None]
        assert llm.llm_engine.speculator.cost.tile == (ROW_TILE if torch_kernel else 1)
        outs[layout] = llm.generate(prompts, params)
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids
               for a, b in zip(outs["torch"], outs["native"]))
    assert same >= 7, f"{same} of 9 requests agree"
    first = [(a.outputs[0].logprobs[0], b.outputs[0].logprobs[0])
             for a, b in zip(outs["torch"], outs["native"])]
    for a, b in first:  # the first token's logprob (same prefix on both sides)
        tok = next(iter(a))
        assert tok in b and abs(a[tok].logprob - b[tok].logprob) < 0.05


def test_a_failed_cpp_operator_build_warns_and_reports_it(monkeypatch, caplog):
    """No ninja / g++ / PyTorch headers: ``load_torch_ops`` says so in one warning and returns
    False, and the caller registers the Python implementation instead of failing."""
    import logging

    from torch.utils import cpp_extension

    from soarllm.kernels import cpu_native

    def broken(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with caplog.at_level(logging.WARNING, logger="soarllm.kernels.cpu_native"):
        ok = cpu_native.load_torch_ops.__wrapped__("int4_gemm_op", "int4_gemm",
                                                   (("SOAR_DEQUANT_MIN_ROWS", DEQUANT_MIN_ROWS),))
    assert ok is False
    assert len(caplog.records) == 1 and "Ninja is required" in caplog.records[0].getMessage()


# W4A8 on AVX-512 VNNI (kernels/csrc/vnni_gemm.c): the oracle is the formula it implements, written
# here independently of quant/w4a16.py's reference: activations rounded to int8 per 32 inputs
# (llama.cpp's Q8 blocks), integer dot products per chunk, float32 scales across chunks.


def _oracle_w4a8(x, q, scales, zeros, group):
    m, k = x.shape
    xf = x.float().reshape(m, k // 32, 32)
    amax = xf.abs().amax(-1, keepdim=True)
    step = amax / 127
    xq = torch.where(amax > 0, torch.round(xf / torch.where(amax > 0, step, 1)), 0.0)
    # w = q * scale + min, scale and min as stored (float16)
    s16 = scales.to(torch.float16).float().repeat_interleave(group, 1)
    low16 = (zeros - 8 * scales).to(torch.float16).float().repeat_interleave(group, 1)
    xd = (xq * step).reshape(m, k)  # the activations the integers stand for
    return xd @ (q.float() * s16 + low16).t()


def _vnni_or_skip():
    from soarllm.quant import vnni

    if vnni.kernels() is None:
        pytest.skip("neither AVX-512 VNNI nor AVX2 here (or no C compiler): W4A16 layers keep "
                    "bfloat16 activations")


@pytest.mark.parametrize(("shape", "group"), [(s, g) for s in SHAPES for g in (32, 64, 128) if s[1] % g == 0])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 11, 33])
def test_w4a8_vnni_kernel_matches_the_int8_activation_formula(shape, group, rows, monkeypatch):
    _vnni_or_skip()
    monkeypatch.setenv("SOARLLM_W4A16_CPU", "vnni")
    out_f, in_f = shape
    torch.manual_seed(out_f * in_f + group + rows)
    weight = torch.randn(out_f, in_f) * 0.05
    layer, (q, s, z) = _w4_layer(out_f, in_f, group, BF16, weight)
    assert layer.cpu_layout == "vnni4"
    x = torch.randn(rows, in_f).to(BF16)
    x[0, :32] = 0  # an all-zero chunk: scale 0, contributes nothing
    got = layer.quant_method.apply(layer, x)
    assert got.shape == (rows, out_f) and got.dtype == BF16
    _close(got, _oracle_w4a8(x, q, s, z, group))
    # and the weight it holds is the layer's (float16 scale and min)
    w = layer.quant_method.dequantized_weight(layer)
    torch.testing.assert_close(w, _oracle_w4(q, s, z, group), rtol=0, atol=2e-3 * weight.abs().max().item())


def test_w4a8_vnni_rows_do_not_depend_on_their_batch(monkeypatch):
    """Each row is quantized and summed on its own, in one order: a row's output is the same bits
    alone or in any batch (what lossless speculative verification relies on)."""
    _vnni_or_skip()
    monkeypatch.setenv("SOARLLM_W4A16_CPU", "vnni")
    torch.manual_seed(7)
    layer, _ = _w4_layer(200, 384, 32, BF16, torch.randn(200, 384) * 0.05)
    x = torch.randn(40, 384).to(BF16)
    whole = layer.quant_method.apply(layer, x)
    for lo, hi in ((0, 1), (3, 4), (5, 13), (7, 40)):
        assert torch.equal(layer.quant_method.apply(layer, x[lo:hi]), whole[lo:hi])


def test_w4a8_vnni_operator_equals_its_python_fallback(monkeypatch):
    """The C++ operator (what compiled steps call) and the ctypes call of the same kernel (the
    fallback where the operator does not build), on the same inputs; and both refuse inputs that
    do not fit the weight."""
    from soarllm.kernels import cpu_native
    from soarllm.quant import vnni

    _vnni_or_skip()
    if not cpu_native.load_torch_ops("vnni_gemm_op", "vnni_gemm"):
        pytest.skip("the C++ operator does not build here (no g++/ninja): only the fallback runs")
    monkeypatch.setenv("SOARLLM_W4A16_CPU", "vnni")
    torch.manual_seed(5)
    layer, _ = _w4_layer(40, 192, 64, BF16, torch.randn(40, 192) * 0.05)
    for m in (0, 1, 6, 40):
        x = torch.randn(m, 192).to(BF16)
        want = vnni._call(vnni.kernels(), x, layer.qweight, layer.scale_min, 40)
        got = torch.ops.soarllm.w4a8_vnni4(x, layer.qweight, layer.scale_min, 40)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    x = torch.randn(3, 192).to(BF16)
    for bad in ((x[:, :160], layer.qweight, layer.scale_min, 40),  # K of another weight
                (x, layer.qweight, layer.scale_min, 49),  # more outputs than the tiles hold
                (x, layer.qweight, layer.scale_min.float(), 40)):  # scales not float16
        with pytest.raises((RuntimeError, ValueError)):
            torch.ops.soarllm.w4a8_vnni4(*bad)
        with pytest.raises(ValueError):
            vnni._call(vnni.kernels(), *bad)


def test_int8_activations_are_the_formats_choice_and_the_setting_overrides_it(monkeypatch):
    """GGUF layers (``int8_activations``) take the VNNI kernel by default, others keep bfloat16;
    SOARLLM_W4A16_CPU=vnni gives it to every layer, =torch to none; a typo is refused."""
    _vnni_or_skip()
    weight = torch.randn(48, 128) * 0.05

    def layout(int8: bool) -> str:
        layer = Linear(128, 48, bias=False, dtype=BF16,
                       quant_method=W4A16Method(32, int8_activations=int8))
        layer.qweight.weight_loader(layer.qweight, weight)
        layer.quant_method.process_weights_after_loading(layer)
        return layer.cpu_layout

    monkeypatch.delenv("SOARLLM_W4A16_CPU", raising=False)
    assert (layout(True), layout(False)) == ("vnni4", "int4pack")
    monkeypatch.setenv("SOARLLM_W4A16_CPU", "vnni")
    assert (layout(True), layout(False)) == ("vnni4", "vnni4")
    monkeypatch.setenv("SOARLLM_W4A16_CPU", "torch")
    assert (layout(True), layout(False)) == ("int4pack", "int4pack")
    monkeypatch.setenv("SOARLLM_W4A16_CPU", "vnn")
    with pytest.raises(ConfigError, match="SOARLLM_W4A16_CPU='vnn'"):
        layout(True)
