"""W8A16: int8 weights with one symmetric scale per output channel, activations in the model dtype.

    w = q * scale        q in [-127, 127], one scale per output row

On the CPU PyTorch's ``_weight_int8pack_mm`` computes x @ (q * scale).T without materializing the
float weight; it is used when the input size is a multiple of 32 (other sizes read out of bounds
in some kernel versions). Like the int4 kernel it is fast only in bfloat16 (its float32 path is
about 15x slower at batch 1 here), so it always runs in bfloat16: scales rounded to bfloat16, a
float32 model's activations cast for the call. On CUDA (with triton installed) the weight is kept
transposed, int8 [K, N], for the Triton GEMV/GEMM of kernels/triton/quant_gemm.py, which
dequantizes in registers (float32 scales). Elsewhere the layer dequantizes and calls F.linear.
Float checkpoints are quantized by round-to-nearest.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from soarllm.kernels.ops import define_op
from soarllm.kernels.triton_utils import triton_available
from soarllm.quant.base import (
    QuantMethod,
    as_float,
    check_rows,
    load_rows,
    new_param,
    set_weight_loader,
    shard_range,
)

_K_MULTIPLE = 32
KERNEL_DTYPE = torch.bfloat16


def quantize_w8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric per-row int8: (q int8 [rows, cols], scale f32 [rows])."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_w8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()[:, None]


def cpu_kernel_applies(in_features: int) -> bool:
    return in_features % _K_MULTIPLE == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def dequantize_w8_bf16(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """bfloat16 [rows, cols]: q (exact in bfloat16) times the row's bfloat16 scale, rounded once."""
    return qweight.to(torch.bfloat16).mul_(scales.to(torch.bfloat16)[:, None])


# From this many rows on (prefill chunks, large batches) the CPU path dequantizes the weight to
# bfloat16 and runs one GEMM: PyTorch's int8 kernel is built for a few rows and its time grows
# linearly with them. `python benchmarks/cpu_int4_prefill.py --scheme w8a16` on a 2-core AVX-512
# machine, the default model's layer shapes (benchmarks/results/cpu_w8a16_prefill/): dequantize +
# GEMM / int8 kernel = 3.1x at 8 rows, 0.85x at 32, 0.48x at 128, 0.36x at 512.
DEQUANT_MIN_ROWS = 32


def _w8a16_rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16 -> [M, N]: the int8 kernel for a few rows, else dequantize + GEMM. An op
    of its own (``soarllm::w8a16_linear_cpu``) so that a compiled graph with a symbolic row count
    takes the branch at run time instead of guarding on the count."""
    if x.shape[0] >= DEQUANT_MIN_ROWS:
        return F.linear(x, dequantize_w8_bf16(qweight, scales))
    return torch.ops.aten._weight_int8pack_mm(x, qweight, scales)


define_op("w8a16_linear_cpu", "(Tensor x, Tensor qweight, Tensor scales) -> Tensor", _w8a16_rows,
          lambda x, qweight, scales: x.new_empty(x.shape[0], qweight.shape[0]))


def w8a16_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(scales.dtype).contiguous()
    if torch.compiler.is_compiling() and x2.shape[0] != 1:
        out = torch.ops.soarllm.w8a16_linear_cpu(x2, qweight, scales)
    else:
        out = _w8a16_rows(x2, qweight, scales)
    return out.reshape(*lead, qweight.shape[0]).to(x.dtype)


class Int8RowsMethod(QuantMethod):
    """int8 weights [out, in] with one float32 scale per output row (W8A16, W8A8): their
    parameters and their round-to-nearest loading; subclasses choose the kernel."""

    checkpoint_params = {"weight": "qweight", "bias": "bias"}
    # a row-parallel layer hands over whole rows (RowParallelLinear.input_shard): the scale of
    # a row is its maximum over all its columns, on every rank
    rounds_whole_rows = True

    def create_weights(self, layer, in_features, out_features, bias, dtype):
        layer.qweight = set_weight_loader(
            new_param((out_features, in_features), torch.int8),
            functools.partial(self.load_weight, layer),
        )
        layer.scales = new_param((out_features,), torch.float32)
        layer.scales.filled_by = "qweight"
        layer.bias = (
            set_weight_loader(new_param((out_features,), dtype), functools.partial(load_rows, layer))
            if bias else None
        )

    def load_weight(self, layer, param, loaded, shard_id=None) -> None:
        """Float weights (or dequantized blocks) are quantized per output row (RTN)."""
        weight = as_float(loaded)
        off, size = shard_range(layer, shard_id, layer.out_features)
        columns = getattr(layer, "input_shard", None)  # (start, size) of a row-parallel rank
        full = (columns is not None and weight.shape[-1] > layer.in_features
                and weight.shape[-1] >= sum(columns))
        width = weight.shape[-1] if full else layer.in_features
        check_rows("weight", shard_id, (size, width), weight.shape)
        q, scale = quantize_w8(weight)
        if full:
            q = q.narrow(1, *columns)
        layer.qweight.data[off : off + size] = q
        layer.scales.data[off : off + size] = scale


class W8A16Method(Int8RowsMethod):
    def describe(self) -> str:
        return "W8A16 (per channel)"

    def create_weights(self, layer, in_features, out_features, bias, dtype):
        super().create_weights(layer, in_features, out_features, bias, dtype)
        layer.use_cpu_kernel = False
        layer.use_triton_kernel = False

    def process_weights_after_loading(self, layer) -> None:
        if layer.qweight.device.type == "cuda" and triton_available():
            from soarllm.kernels.triton import quant_gemm

            layer.qweight = nn.Parameter(quant_gemm.pack_w8(layer.qweight.data), requires_grad=False)
            layer.scales.data = layer.scales.data.float()
            layer.use_triton_kernel = True
            return
        layer.use_cpu_kernel = layer.qweight.device.type == "cpu" and cpu_kernel_applies(
            layer.in_features
        )
        dtype = KERNEL_DTYPE if layer.use_cpu_kernel else layer.params_dtype
        layer.scales.data = layer.scales.data.to(dtype)

    def apply(self, layer, x):
        if layer.use_triton_kernel:
            from soarllm.kernels.triton import quant_gemm

            return quant_gemm.w8a16_gemm(x, layer.qweight, layer.scales, layer.bias)
        if layer.use_cpu_kernel:
            out = w8a16_linear_cpu(x, layer.qweight, layer.scales)
            return out if layer.bias is None else out + layer.bias
        w = dequantize_w8(layer.qweight, layer.scales)
        return F.linear(x, w.to(x.dtype), layer.bias)

    def dequantized_weight(self, layer) -> torch.Tensor:
        if layer.use_triton_kernel:
            return dequantize_w8(layer.qweight.t(), layer.scales)
        return dequantize_w8(layer.qweight, layer.scales)
