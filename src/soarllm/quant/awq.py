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

Then the clip search: per row and group, the quantization range [min, max] of the (scaled)
weights shrunk by r in [1 - CLIP_SHRINK, 1], r minimizing that group's own share of the output
error, d_g H_gg d_g^T (the diagonal block of H; r = 1 is plain rounding, so never worse by it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from soarllm.quant.activations import ChannelStats
from soarllm.quant.compressed_tensors import fake_quantize
from soarllm.quant.gptq import HessianAccumulator, rtn_quantize
from soarllm.quant.smooth import SmoothMapping, fold_scales, layer_mappings

GRID = 20  # alpha = 0, 1/20, ..., 19/20 (AutoAWQ's grid)
CLIP_GRID = 20  # range shrink steps of 1/20 ...
CLIP_SHRINK = 0.5  # ... down to half the range


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


def clip_search(weight: torch.Tensor, gram: torch.Tensor, args, scale_dtype: torch.dtype,
                grid: int = CLIP_GRID, shrink: float = CLIP_SHRINK):
    """(quantized weight float32 on the grid, scale, zero point) of a group-quantized layer with
    each (row, group)'s range shrunk by the factor that minimizes its output error under the
    layer input's Gram matrix `gram` [in, in]."""
    from compressed_tensors.quantization.utils import calculate_qparams

    if args.strategy != "group":
        raise ValueError("the clip search is per group: it needs group-wise args")
    w = weight.detach().float()
    rows, cols = w.shape
    g = args.group_size
    groups = cols // g
    lo, hi = w.reshape(rows, groups, g).amin(-1), w.reshape(rows, groups, g).amax(-1)
    blocks = torch.stack([gram[k * g:(k + 1) * g, k * g:(k + 1) * g]
                          for k in range(groups)]).float()  # [groups, g, g]
    best_err = torch.full((rows, groups), float("inf"))
    best_scale = best_zp = None
    for k in range(int(grid * shrink) + 1):
        r = 1 - k / grid
        scale, zp = calculate_qparams(lo * r, hi * r, args)
        scale = scale.to(scale_dtype)
        d = (w - fake_quantize(w, scale, zp, args)).reshape(rows, groups, g)
        err = torch.einsum("rgi,gij,rgj->rg", d, blocks, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        best_zp = zp if best_zp is None else torch.where(better, zp, best_zp)
    return fake_quantize(w, best_scale, best_zp, args), best_scale, best_zp


def input_groups(layer: nn.Module) -> list[tuple[list[str], SmoothMapping | None]]:
    """A decoder layer's linears grouped by the input they read (names in the layer): each
    mapping's balance layers, and alone each linear no mapping balances (o_proj under GQA)."""
    mappings = layer_mappings(layer)
    covered = {n for m in mappings for n in m.balance_names}
    groups: list[tuple[list[str], SmoothMapping | None]] = [(m.balance_names, m) for m in mappings]
    groups += [([n], None) for n, mod in layer.named_modules()
               if isinstance(mod, nn.Linear) and n not in covered]
    return groups


def quantize_layer(layer: nn.Module, observers: dict[str, AWQObserver], args,
                   scale_dtype: torch.dtype, clip: bool = True):
    """AWQ on one decoder layer: search every mapping's factors on the unscaled weights, fold
    them all, then quantize each linear (clip search, or plain rounding) under the Gram matrix
    of its scaled input. `observers` holds the first linear of each input group. Returns
    ({linear name in the layer: (quantized weight, scale, zero point)}, the mappings' results)."""
    groups = input_groups(layer)
    found = [(m, awq_mapping(m, observers[names[0]], args, scale_dtype))
             for names, m in groups if m is not None]
    for mapping, result in found:
        fold_scales(mapping, result.scales)
    factors = {m.balance_names[0]: r.scales for m, r in found}
    quantized = {}
    for names, _ in groups:
        gram = observers[names[0]].gram.H
        s = factors.get(names[0])
        if s is not None:  # the input is now x / s
            gram = gram / s[:, None] / s[None, :]
        for name in names:
            w = layer.get_submodule(name).weight.data
            quantized[name] = (clip_search(w, gram, args, scale_dtype) if clip
                               else rtn_quantize(w, args, scale_dtype))
    return quantized, [r for _, r in found]
