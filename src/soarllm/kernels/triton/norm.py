"""RMSNorm and fused residual-add + RMSNorm (Triton): one program per row, float32 math.

    rms_norm(x, w, eps, offset)               -> x / rms(x) * (offset + w)
    fused_add_rms_norm(x, r, w, eps, offset)  -> (rms_norm(x + r), x + r)

The fused form is vLLM's: one pass reads x and the residual, stores their sum (the residual carried
to the next layer), reduces and normalizes it. Rounding follows the PyTorch layer (layers/norm.py)
so both paths agree to the last bit in most elements: with ``offset == 0`` the normalized row is
rounded to x's dtype before the weight multiplies it (as Llama's reference does); with an offset
(Gemma's ``1 + w``) the scale is applied in float32 and rounded once. Rows of any length up to 64K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_out, stride_res,
    n_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / n_cols
    h = h * (1.0 / tl.sqrt(mean_sq + eps))
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        y = h * (w + offset)
    else:
        y = h.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x, residual, weight, eps, offset):
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match rows of {n}")
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    block = triton.next_power_of_2(n)
    num_warps = min(max(block // 256, 1), 16)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            n, float(eps), float(offset),
            HAS_RESIDUAL=residual is not None, HAS_OFFSET=bool(offset), BLOCK=block,
            num_warps=num_warps,
        )
    return out.view(x.shape), res_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x [..., H] normalized over its last dimension and scaled by (offset + weight), in x's dtype."""
    return _launch(x, None, weight, eps, offset)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is rounded to x's dtype before the norm."""
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    return _launch(x, residual, weight, eps, offset)
