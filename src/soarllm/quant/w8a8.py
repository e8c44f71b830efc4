"""W8A8: int8 weights and int8 activations, multiplied as integers.

    w ~ qw * sw    one symmetric scale per output channel, sw = max|w_row| / 127
    x ~ qx * sx    one symmetric scale per token, computed at apply time: sx = max|x_row| / 127
    y = (qx @ qw.T) * sx[:, None] * sw[None, :] + bias

Dynamic per-token scales need no calibration and follow each token's own range, so a request's
output does not depend on what else is in the batch. With plain round-to-nearest weights this is
the baseline SmoothQuant has to beat: a few outlier input channels set max|x_row| and leave the
other channels only a few of the 255 levels.

The int8 x int8 -> int32 product is ``torch._int_mm`` (exact accumulation). The weight stays
int8 [out, in] row-major and goes in as its transposed view: the "TN" layout cuBLAS's int8 GEMM
wants, and one the CPU kernel reads without a copy. On the CPU ``_int_mm`` takes any shape. On
CUDA it needs more than 16 rows and input / output sizes that are multiples of 8: fewer rows (a
decode step) are padded with zero rows to 17; layers whose sizes are not multiples of 8, and
other devices, take the portable path, the dequantized matmul of the fake-quantized activation
(the same integers multiplied in float32, then scaled). The scaling runs in float32 and the
result is cast to the activation dtype, so float32 and bfloat16 models share one path. Float
checkpoints are quantized by round-to-nearest at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from soarllm.quant.w8a16 import Int8RowsMethod, dequantize_w8

_CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA: more than 16 rows
_CUDA_MULTIPLE = 8  # ... and input / output sizes that are multiples of 8


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x [M, K]: (q int8 [M, K] in [-127, 127], scale f32 [M])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = (xf / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def int_mm_min_rows(device: torch.device, in_features: int, out_features: int) -> int | None:
    """The fewest rows ``torch._int_mm`` takes for this layer on `device`, or None where it
    does not apply (the layer then uses the portable path)."""
    if device.type == "cpu":
        return 1
    if device.type == "cuda" and in_features % _CUDA_MULTIPLE == 0 \
            and out_features % _CUDA_MULTIPLE == 0:
        return _CUDA_MIN_ROWS
    return None


def int8_gemm(qx: torch.Tensor, qweight: torch.Tensor, min_rows: int) -> torch.Tensor:
    """int32 [M, N] = qx [M, K] @ qweight [N, K].T, padding qx to `min_rows` rows."""
    rows = qx.shape[0]
    if rows < min_rows:
        qx = F.pad(qx, (0, 0, 0, min_rows - rows))
    out = torch._int_mm(qx, qweight.t())
    return out[:rows] if rows < min_rows else out


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, min_rows: int | None) -> torch.Tensor:
    """y = x @ w.T (+ bias) with x quantized per token; `min_rows` None: the portable path."""
    lead = x.shape[:-1]
    qx, sx = quantize_per_token(x.reshape(-1, x.shape[-1]))
    if min_rows is not None:
        acc = int8_gemm(qx, qweight, min_rows).float()
    else:
        acc = F.linear(qx.float(), qweight.float())
    out = acc.mul_(sx[:, None]).mul_(scales)
    if bias is not None:
        out = out.add_(bias)
    return out.to(x.dtype).reshape(*lead, qweight.shape[0])


class W8A8Method(Int8RowsMethod):
    def describe(self) -> str:
        return "W8A8 (per channel, dynamic per token)"

    def create_weights(self, layer, in_features, out_features, bias, dtype):
        super().create_weights(layer, in_features, out_features, bias, dtype)
        layer.int_mm_min_rows = None

    def process_weights_after_loading(self, layer) -> None:
        layer.qweight.data = layer.qweight.data.contiguous()
        layer.scales.data = layer.scales.data.float()
        layer.int_mm_min_rows = int_mm_min_rows(layer.qweight.device, layer.in_features,
                                                layer.out_features)

    def apply(self, layer, x):
        return w8a8_linear(x, layer.qweight, layer.scales, layer.bias, layer.int_mm_min_rows)

    def dequantized_weight(self, layer) -> torch.Tensor:
        return dequantize_w8(layer.qweight, layer.scales)
