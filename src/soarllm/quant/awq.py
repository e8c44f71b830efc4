"""AWQ (Lin et al., 2024): activation-aware weight quantization for W4A16.

Weight columns that multiply large activations matter most. Scaling those columns up before
rounding (and the inputs down, folded into the op before: quant/smooth.py's mappings) gives them
relatively finer steps. Per mapping, the input-channel factors are

    s = mean|x|^alpha, normalized by sqrt(max(s) min(s)),

with alpha searched over a grid in [0, 1) for the least output error of the group-quantized
(round to nearest) balance layers on the calibration activations:

    err(alpha) = sum over balance layers ||X W^T - X (Q(W diag s) diag(1/s))^T||^2
               = sum over rows d of D = W - Q(W diag s) / s of  d H d^T,     H = X^T X.

H is the layer input's Gram matrix (GPTQ's Hessian up to 2/n), accumulated over every
calibration token, so the search never holds activations and costs one [out, in] x [in, in]
product per grid point. alpha = 0 (s = 1) is round to nearest itself: on the calibration text
AWQ is never worse than RTN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from soarllm.quant.activations import ChannelStats
from soarllm.quant.gptq import HessianAccumulator, rtn_quantize
from soarllm.quant.smooth import SmoothMapping

GRID = 20  # alpha = 0, 1/20, ..., 19/20 (AutoAWQ's grid)


class AWQObserver:
    """A mapping input's mean|x| per channel and Gram matrix, over every calibration token."""

    def __init__(self, channels: int):
        self.stats = ChannelStats.empty(channels)
        self.gram = HessianAccumulator(channels)

    def add(self, x: torch.Tensor) -> None:
        self.stats.add(x)
        self.gram.add(x)


@dataclass
class AWQResult:
    scales: torch.Tensor
    alpha: float
    error: float  # relative output error at alpha (sqrt of err / ||X W^T||^2)
    rtn_error: float  # the same at alpha = 0


def output_error(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor) -> float:
    """sum over rows d of (W - Q) of d H d^T: ||X W^T - X Q^T||^2 up to H's normalization."""
    d = (weight - quantized).double()
    return ((d @ gram.double()) * d).sum().item()


def search_scales(weight: torch.Tensor, absmean: torch.Tensor, gram: torch.Tensor, args,
                  scale_dtype: torch.dtype, grid: int = GRID) -> AWQResult:
    """The grid's best factors for the stacked balance weights [out, in] (float32)."""
    w = weight.float()
    base = absmean.float().clamp(min=1e-4)
    total = output_error(w, torch.zeros_like(w), gram)
    best: tuple[float, float, torch.Tensor] | None = None
    rtn = 0.0
    for k in range(grid):
        alpha = k / grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q, _, _ = rtn_quantize(w * s[None, :], args, scale_dtype)
        err = output_error(w, q / s[None, :], gram)
        if k == 0:
            rtn = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    err, alpha, s = best
    scale = 1 / total if total > 0 else 0.0
    return AWQResult(s, alpha, (err * scale) ** 0.5, (rtn * scale) ** 0.5)


def awq_mapping(mapping: SmoothMapping, observer: AWQObserver, args,
                scale_dtype: torch.dtype, grid: int = GRID) -> AWQResult:
    """Search one mapping's factors; the caller folds them (smooth.fold_scales)."""
    return search_scales(mapping.weights(), observer.stats.absmean, observer.gram.H, args,
                         scale_dtype, grid)
