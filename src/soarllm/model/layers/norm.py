from __future__ import annotations

import torch
from torch import nn

from soarllm.kernels.triton_utils import use_triton_kernel


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as the reference implementations do.

    ``offset=1.0`` gives Gemma's variant, which scales by (1 + weight).

    ``forward(x, residual)`` is vLLM's fused residual form: it returns (norm(x + residual),
    x + residual), the sum being the residual stream carried to the next norm. On CUDA (outside
    torch.compile tracing) both forms run one Triton kernel (kernels/triton/norm.py).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=torch.float32, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if use_triton_kernel(x):
            from soarllm.kernels.triton import norm

            if residual is None:
                return norm.rms_norm(x, self.weight, self.eps, self.offset)
            return norm.fused_add_rms_norm(x, residual, self.weight, self.eps, self.offset)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)
