"""Fake quantization of activations: quantize then dequantize in float, on compressed-tensors' own
grid, so a float model computes what a W8A8 model computes.

`soar quantize` leaves the weights of the transformers model it quantized on their integer grid;
with `activation_quantization` around its forward, each linear input is also rounded to int8 with
one scale per token (dynamic: from that token's own max|x|, nothing calibrated). This is how the
errors of SmoothQuant and plain W8A8 are measured, and what a written W8A8 checkpoint must
reproduce wherever it is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def quantize_tokens(x: torch.Tensor, args) -> torch.Tensor:
    """x [..., channels] quantized and dequantized with one (scale, zero point) per token."""
    from compressed_tensors.quantization.utils import calculate_qparams

    from soarllm.quant.compressed_tensors import fake_quantize

    if args.strategy != "token" or not args.dynamic:
        raise ValueError(f"quantize_tokens takes dynamic per-token args, not {args.strategy}")
    xf = x.float()
    scale, zp = calculate_qparams(xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True),
                                  args)
    return fake_quantize(xf, scale, zp, args).to(x.dtype)


@contextmanager
def activation_quantization(linears: Iterable[nn.Linear], args) -> Iterator[None]:
    """Inside the block, every input of `linears` is fake-quantized per token under `args`."""

    def hook(_module, inputs):
        return (quantize_tokens(inputs[0], args), *inputs[1:])

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
