"""Gated activations (Triton): [..., 2I] -> act(x[..., :I]) * x[..., I:], float32 math.

Rounding follows the PyTorch functions in layers/activation.py: the activation is rounded to x's
dtype before the product, as ``F.silu(gate) * up`` does. The grid is (rows, column blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols,
                        ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == "silu":
        a = gate / (1.0 + tl.exp(-gate))
    else:  # gelu, tanh approximation: 0.5 g (1 + tanh(u)) == g * sigmoid(2u), no cancellation;
        # 0.79788... is sqrt(2 / pi)
        u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        a = gate / (1.0 + tl.exp(-2.0 * u))
    a = a.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (a * up).to(out_ptr.dtype.element_ty), mask=mask)


def _act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"{act}_and_mul: last dimension {two_i} is not even (gate and up halves)")
    n = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0] and n:
        grid = (x2.shape[0], triton.cdiv(n, _BLOCK))
        _act_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), n, ACT=act, BLOCK=_BLOCK,
                                  num_warps=4)
    return out.view(*x.shape[:-1], n)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for x = [gate | up] along the last dimension (Llama's MLP)."""
    return _act_and_mul(x, "silu")


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GELU-tanh(gate) * up for x = [gate | up] (Gemma's MLP)."""
    return _act_and_mul(x, "gelu_tanh")
