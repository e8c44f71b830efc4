"""Gated activations of the MLP: [..., 2I] -> act(gate) * up. On CUDA (outside torch.compile
tracing) one Triton kernel each (kernels/triton/activation.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from soarllm.kernels.triton_utils import use_triton_kernel


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton_kernel(x):
        from soarllm.kernels.triton import activation

        return activation.silu_and_mul(x)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton_kernel(x):
        from soarllm.kernels.triton import activation

        return activation.gelu_tanh_and_mul(x)
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]


ACT_AND_MUL = {
    "silu": silu_and_mul,
    "swish": silu_and_mul,
    "gelu_pytorch_tanh": gelu_tanh_and_mul,
    "gelu_tanh": gelu_tanh_and_mul,
}
