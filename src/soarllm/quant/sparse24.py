"""W8A16 / W4A16 with 2:4 sparsity, kept compressed in memory: a sparse-24-bitmask checkpoint's
layers as stored (quant/sparsity.py has the layout).

Resident per layer, for [out, in] weights:

    values      the kept integers, half the inputs: int8 [out, in / 2] (8-bit), or two 4-bit
                values q + 8 per byte, uint8 [out, in / 4] (even kept index in the low nibble)
    bitmask     uint8 [out, ceil(in / 8)], the file's, 2 bits set per group of 4 inputs
    scales      [out, groups] in the model dtype (one group per row for per-channel int8)
    zero_points int8 [out, groups], asymmetric int4 only; w = (q - zero_point) * scale

so an int8 layer holds 5/8 of the dense layer's weight bytes and an int4 layer 3/4 (plus scales).

``apply`` rebuilds the dense float weight, scattering the dequantized kept values into zeros at
the kept columns, and calls F.linear: exactly the weight the library's decompression gives. This
saves memory and file size but does not speed anything up: on the CPU each call pays a dense
weight's worth of scatter and a float matmul, slower than the dense int kernels of
quant/w8a16.py and quant/w4a16.py (no CPU kernel multiplies 2:4 integers). Load the checkpoint
with ``quantization="densify"`` to run those dense kernels instead (no memory saved).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from soarllm.errors import ConfigError
from soarllm.quant.base import (
    QuantMethod,
    check_rows,
    load_rows,
    new_param,
    set_weight_loader,
    shard_range,
)
from soarllm.quant.sparsity import kept_columns
from soarllm.quant.w4a16 import pack_nibbles, unpack_nibbles


class Sparse24Method(QuantMethod):
    """Integer weights (8-bit per channel or 4-bit per group) with a 2:4 mask, compressed."""

    checkpoint_params = {"weight": "values", "bias": "bias"}

    def __init__(self, num_bits: int, group_size: int | None, symmetric: bool):
        if num_bits not in (4, 8):
            raise ConfigError(f"2:4 layers are served for 8- or 4-bit weights, not {num_bits}-bit")
        self.num_bits, self.group_size, self.symmetric = num_bits, group_size, symmetric

    def describe(self) -> str:
        group = f"group {self.group_size}" if self.group_size else "per channel"
        return f"W{self.num_bits}A16 2:4 ({group})"

    def create_weights(self, layer, in_features, out_features, bias, dtype):
        if in_features % 4 or (self.group_size and in_features % self.group_size):
            raise ConfigError(f"a 2:4 layer needs a multiple of 4 inputs (and of the group "
                              f"size {self.group_size}); this one has {in_features} (serve the "
                              f"checkpoint with quantization='densify' to run it dense)")
        kept = in_features // 2
        width, vdtype = (kept, torch.int8) if self.num_bits == 8 else (kept // 2, torch.uint8)
        layer.values = set_weight_loader(new_param((out_features, width), vdtype),
                                         functools.partial(self.load_weight, layer))
        groups = in_features // self.group_size if self.group_size else 1
        layer.bitmask = new_param((out_features, -(-in_features // 8)), torch.uint8)
        layer.scales = new_param((out_features, groups), dtype)
        filled = [layer.bitmask, layer.scales]
        if not self.symmetric:
            layer.zero_points = new_param((out_features, groups), torch.int8)
            filled.append(layer.zero_points)
        for p in filled:
            p.filled_by = "values"
        layer.bias = (
            set_weight_loader(new_param((out_features,), dtype), functools.partial(load_rows, layer))
            if bias else None
        )

    def load_weight(self, layer, param, loaded, shard_id=None) -> None:
        to_sparse24 = getattr(loaded, "to_sparse24", None)
        if to_sparse24 is None and getattr(layer, "tp", None) is not None \
                and layer.tp.world_size > 1:
            # a tensor-parallel rank's inputs that start inside a group or a byte of the mask
            raise ConfigError(
                f"tensor_parallel_size={layer.tp.world_size} cuts a 2:4 layer's inputs inside a "
                f"quantization group (of {self.group_size or 'the whole row'}) or a byte of its "
                f"mask (8 inputs); serve this checkpoint with quantization='densify' (the dense "
                f"int kernels, no memory saved), or with a tensor_parallel_size whose slices "
                f"start on whole groups")
        if to_sparse24 is None:
            raise ValueError("a 2:4 layer loads from a sparse-24-bitmask checkpoint's tensors, "
                             "not a dense weight")
        off, size = shard_range(layer, shard_id, layer.out_features)
        check_rows("weight", shard_id, (size, layer.in_features), loaded.shape)
        q, bitmask, scale, zp = to_sparse24()
        rows = slice(off, off + size)
        layer.values.data[rows] = q if self.num_bits == 8 else pack_nibbles(q.to(torch.int16) + 8)
        layer.bitmask.data[rows] = bitmask
        layer.scales.data[rows] = scale.to(layer.scales.dtype).reshape(size, -1)
        if not self.symmetric:
            layer.zero_points.data[rows] = zp.reshape(size, -1)

    def kept_values(self, layer) -> torch.Tensor:
        """Signed kept integers [out, in / 2]."""
        if self.num_bits == 8:
            return layer.values
        return unpack_nibbles(layer.values).to(torch.int8) - 8

    def dequantized_weight(self, layer) -> torch.Tensor:
        """The dense weight [out, in] in the scales' dtype, pruned entries exactly 0."""
        cols = kept_columns(layer.bitmask, layer.in_features)
        group = cols // self.group_size if self.group_size else torch.zeros_like(cols)
        scale = layer.scales.gather(1, group)
        q = self.kept_values(layer).to(scale.dtype)
        if not self.symmetric:
            q = q - layer.zero_points.gather(1, group).to(scale.dtype)
        w = torch.zeros(layer.out_features, layer.in_features, dtype=scale.dtype,
                        device=scale.device)
        return w.scatter_(1, cols, q * scale)

    def apply(self, layer, x):
        return F.linear(x, self.dequantized_weight(layer).to(x.dtype), layer.bias)
