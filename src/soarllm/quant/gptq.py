"""GPTQ (Frantar et al., 2022): quantize a linear layer column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's
reconstruction loss ||W X - Q X||^2, H = 2 X X^T / n over calibration activations X.

    damping     H += damp * mean(diag H) * I (dead inputs, diag 0, get 1 and a zero column)
    blocks      columns in blocks of `block_size`; the error is propagated lazily (the paper's
                "lazy batch" update)
    groups      group-wise scales: each group's (scale, zero point) is fixed when its first
                column is reached, from the weights as updated so far
    act-order   columns processed in order of decreasing diag(H), groups kept in the original
                column order with their (scale, zero point) fixed up front from the weights
                (llm-compressor's actorder="weight": the file needs no group index)

The rounding grid (calculate_qparams, fake_quantize) is compressed-tensors' own, so a weight
returned here lies exactly on the grid the file stores.

Calibration (`SequentialCalibrator`) runs the decoder layers one at a time: the inputs of layer
i are the outputs of layers 0..i-1 *after* they were quantized, captured with hooks on a
transformers model holding the same weights. Only one decoder layer's Hessians live at a time.
AWQ (quant/awq.py) runs on the same calibrator with its own observer of the layer inputs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from soarllm.quant.compressed_tensors import fake_quantize, qparams


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, args, scale_dtype: torch.dtype,
                  *, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  mask: torch.Tensor | None = None):
    """(quantized weight float32 [out, in] on the grid, scale, zero point) of one layer.

    `mask` (bool [out, in], e.g. 2:4): the weights it drops are quantized to exactly 0 and their
    error is compensated like rounding error (SparseGPT with a fixed mask)."""
    W = weight.detach().float().clone()
    keep = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.bool()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    group = args.group_size if args.strategy == "group" else None
    if group is None or act_order:  # fixed up front (per channel, or act-order groups)
        scale, zp = qparams(W * keep, args, scale_dtype)
    else:
        scale = torch.empty(rows, cols // group, dtype=scale_dtype)
        zp = torch.empty(rows, cols // group, dtype=torch.int8)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H, keep = W[:, perm], H[perm][:, perm], keep[:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError:  # not positive definite even damped: add more damping
        H += 0.1 * torch.mean(torch.diag(H)) * torch.eye(cols)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    if group is not None:  # a group never straddles two blocks
        block_size = max(group, block_size // group * group)
    Q = torch.zeros_like(W)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1, Hinv1, keep1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1], keep[:, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = perm[b0 + i].item()  # the original column index
            w, d = W1[:, i], Hinv1[i, i]
            if group is not None and not act_order and col % group == 0:
                g = col // group
                # this group's qparams from the weights as updated so far (not yet permuted)
                s, z = qparams(W1[:, i : i + group] * keep1[:, i : i + group], args, scale_dtype)
                scale[:, g], zp[:, g] = s.reshape(-1), z.reshape(-1)
            q = _fake_quantize_column(w, col, scale, zp, args) * keep1[:, i]
            Q[:, b0 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    inverse = torch.argsort(perm)
    return Q[:, inverse], scale, zp


def _fake_quantize_column(w: torch.Tensor, col: int, scale, zp, args) -> torch.Tensor:
    """One column quantized with its group's (or channel's) parameters, by the library."""
    g = col // args.group_size if args.strategy == "group" else 0
    s, z = scale[:, g : g + 1], zp[:, g : g + 1]
    from compressed_tensors.quantization import QuantizationArgs

    per_row = QuantizationArgs(num_bits=args.num_bits, type=args.type, symmetric=args.symmetric,
                               strategy="channel")
    return fake_quantize(w[:, None], s, z, per_row)[:, 0]


def rtn_quantize(weight: torch.Tensor, args, scale_dtype: torch.dtype):
    """Round to nearest on the same grid: (quantized weight float32, scale, zero point)."""
    scale, zp = qparams(weight, args, scale_dtype)
    return fake_quantize(weight, scale, zp, args), scale, zp


class HessianAccumulator:
    """H = 2/n sum x x^T over the rows x of every input a linear layer sees."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = math.sqrt(2 / self.n) * x
        self.H += x.t() @ x


def reconstruction_error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - Q X||_F / ||W X||_F over activations x [tokens, in]."""
    x = x.reshape(-1, x.shape[-1]).float()
    ref = x @ weight.float().t()
    return ((ref - x @ quantized.float().t()).norm() / ref.norm()).item()


class SequentialCalibrator:
    """Runs a transformers causal LM's decoder layers one at a time over calibration samples,
    collecting each layer's linear inputs (as Hessians, or into the caller's observers) and
    letting the caller quantize the layer before its outputs become the next layer's inputs."""

    def __init__(self, model: nn.Module, samples: torch.Tensor, progress: bool = True,
                 method: str = "GPTQ"):
        self.model = model
        self.samples = samples  # [num_samples, seq_len] token ids
        self.progress = progress
        self.method = method  # names the progress bars and errors

    def _decoder_layers(self) -> nn.ModuleList:
        base = getattr(self.model, "model", self.model)
        layers = getattr(base, "layers", None)
        if layers is None:
            from soarllm.errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no model.layers; {self.method}'s sequential "
                "calibration needs a decoder-only model (quantize with --method rtn)"
            )
        return layers

    @torch.no_grad()
    def _first_inputs(self, layers: nn.ModuleList) -> list[tuple[tuple, dict]]:
        """(args, kwargs) of decoder layer 0 for each sample, caught before it runs."""
        caught: list[tuple[tuple, dict]] = []

        class _Stop(Exception):
            pass

        def catch(module, args, kwargs):
            caught.append((args, kwargs))
            raise _Stop

        from tqdm.auto import tqdm

        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for ids in tqdm(self.samples, desc=f"{self.method} calibration inputs", unit="sample",
                            file=sys.stderr, disable=not self.progress):
                try:
                    self.model(input_ids=ids[None], use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        return caught

    @torch.no_grad()
    def run(self, quantize_layer: Callable[[int, nn.Module, dict], None],
            observe: Callable[[str, nn.Linear], object | None] | None = None):
        """For each decoder layer: Hessians of its nn.Linear inputs, then
        ``quantize_layer(index, layer, {linear name in the layer: accumulator})``, which replaces
        the layer's weights by their quantized values; then the layer's outputs are recomputed.
        ``observe(name, linear)`` makes the object whose ``add(x)`` sees a linear's inputs instead
        of a HessianAccumulator (None: that linear is not observed)."""
        from tqdm.auto import tqdm

        if observe is None:
            def observe(_name, mod):
                return HessianAccumulator(mod.in_features)

        layers = self._decoder_layers()
        inputs = self._first_inputs(layers)
        bar = tqdm(range(len(layers)), desc=f"{self.method} layers", unit="layer",
                   file=sys.stderr, disable=not self.progress)
        for i in bar:
            layer = layers[i]
            accs: dict[str, object] = {}
            handles = []
            for name, mod in layer.named_modules():
                if isinstance(mod, nn.Linear):
                    acc = observe(name, mod)
                    if acc is None:
                        continue
                    accs[name] = acc
                    handles.append(mod.register_forward_hook(
                        lambda _m, inp, _out, acc=acc: acc.add(inp[0])))
            try:
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            quantize_layer(i, layer, accs)
            del accs
            outputs = []
            for args, kwargs in inputs:
                out = layer(*args, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
                if args:
                    outputs.append(((hidden, *args[1:]), kwargs))
                else:
                    outputs.append((args, {**kwargs, "hidden_states": hidden}))
            inputs = outputs
