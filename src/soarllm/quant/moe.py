"""How a FusedMoE layer stores its stacked expert weights: in the model dtype or quantized.

A FusedMoE method is the experts' counterpart of a Linear's QuantMethod: it creates the stacked
parameters ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (their names stay, their
dtype and shape follow the format) plus, quantized, ``<name>_scale`` (and ``<name>_zero``), and
stores each float block the layer's weight_loader hands it (one expert's gate, up or down rows, or
a whole stack) in its format. The formats are those of the Linear methods, per expert:

    W8A16   int8 [E, N, K], one symmetric float32 scale per output row      w = q * s
    W4A16   two 4-bit values per byte [E, N, K/2], float32 scale and zero per group of K
            (tinygemm's w = (q - 8) * s + z, quant/w4a16.py)

The grouped matmul (layers/fused_moe.py) dequantizes, inside its loop over the experts that got
tokens, only those experts' weights (``dequantize_expert``) and multiplies in the activations'
dtype: the simpler correct choice (PyTorch's int8 / int4 CPU kernels round activations to
bfloat16, and run one expert's slice per call anyway). Routers stay in the model dtype (their
logits pick the experts), as in vLLM.
"""

from __future__ import annotations

import torch
from torch import nn

from soarllm.errors import ConfigError
from soarllm.quant.base import new_param
from soarllm.quant.w4a16 import GROUP_SIZES, dequantize_w4, pack_nibbles, quantize_w4
from soarllm.quant.w8a16 import dequantize_w8, quantize_w8

STACKS = ("gate_up_proj", "down_proj")


def stack_shapes(layer) -> dict[str, tuple[int, int, int]]:
    """Float [E, N, K] of the layer's two stacks on this rank."""
    e, i, h = layer.local_experts, layer.local_intermediate, layer.hidden_size
    return {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}


class UnquantizedFusedMoEMethod:
    """The experts in the model dtype."""

    def create_weights(self, layer: nn.Module, dtype: torch.dtype) -> None:
        for name, shape in stack_shapes(layer).items():
            setattr(layer, name, new_param(shape, dtype))

    def store(self, layer: nn.Module, name: str, experts, rows: slice,
              weight: torch.Tensor) -> None:
        """Write float ``weight`` ([N', K] of one expert, or [E, N', K]) into rows ``rows`` of
        ``experts`` (an index or a slice) of the stack ``name``."""
        getattr(layer, name).data[experts, rows].copy_(weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def describe(self) -> str:
        return "unquantized"


class W8A16FusedMoEMethod(UnquantizedFusedMoEMethod):
    """int8 experts, one scale per output row of each expert (round to nearest at load)."""

    def create_weights(self, layer, dtype):
        for name, (e, n, k) in stack_shapes(layer).items():
            setattr(layer, name, new_param((e, n, k), torch.int8))
            scale = new_param((e, n), torch.float32)
            scale.filled_by = name  # loaded with its stack
            setattr(layer, f"{name}_scale", scale)

    # experts split by width hand over the down projection's whole rows (``columns``: this
    # rank's part): a row's scale is its maximum over all its columns, as on one rank
    rounds_whole_rows = True

    def store(self, layer, name, experts, rows, weight, columns=None):
        q, scale = quantize_w8(weight.reshape(-1, weight.shape[-1]))
        q = q.reshape(weight.shape)
        if columns is not None:
            q = q.narrow(-1, *columns)
        getattr(layer, name).data[experts, rows] = q
        getattr(layer, f"{name}_scale").data[experts, rows] = scale.reshape(weight.shape[:-1])

    def describe(self) -> str:
        return "W8A16 (per channel)"


class W4A16FusedMoEMethod(UnquantizedFusedMoEMethod):
    """int4 experts, asymmetric, one scale and zero per group of inputs (round to nearest)."""

    def __init__(self, group_size: int = 32):
        if group_size not in GROUP_SIZES:
            raise ConfigError(f"W4A16 group size {group_size} is not supported; use one of "
                              f"{GROUP_SIZES}")
        self.group_size = group_size

    def create_weights(self, layer, dtype):
        g = self.group_size
        for name, (e, n, k) in stack_shapes(layer).items():
            if k % g:
                raise ConfigError(
                    f"{layer.prefix or 'MoE layer'}: W4A16 groups of {g} do not divide the "
                    f"experts' input size {k} ({name}); use quantization='w4a16-g32' or "
                    "'w8a16' (per channel)")
            setattr(layer, name, new_param((e, n, k // 2), torch.uint8))
            for part in ("scale", "zero"):
                param = new_param((e, n, k // g), torch.float32)
                param.filled_by = name
                setattr(layer, f"{name}_{part}", param)

    def store(self, layer, name, experts, rows, weight):
        k = weight.shape[-1]
        q, scale, zero = quantize_w4(weight.reshape(-1, k), self.group_size)
        self.store_int4(layer, name, experts, rows, q.reshape(weight.shape),
                        scale.reshape(*weight.shape[:-1], -1), zero.reshape(*weight.shape[:-1], -1))

    def store_int4(self, layer, name, experts, rows, q, scale, zero):
        """Already 4-bit weights (q uint8 [.., N', K] in [0, 16), w = (q - 8) scale + zero per
        group; a GGUF file's blocks, repacked exactly) into ``experts`` / ``rows`` of ``name``."""
        if scale.shape[-1] * self.group_size != q.shape[-1]:
            raise ValueError(f"{name}: int4 weights in groups of {q.shape[-1] // scale.shape[-1]}, "
                             f"the layer's are {self.group_size}")
        lead = q.shape[:-1]
        getattr(layer, name).data[experts, rows] = pack_nibbles(
            q.reshape(-1, q.shape[-1])).reshape(*lead, q.shape[-1] // 2)
        getattr(layer, f"{name}_scale").data[experts, rows] = scale
        getattr(layer, f"{name}_zero").data[experts, rows] = zero

    def describe(self) -> str:
        return f"W4A16 (group {self.group_size})"


def dequantize_expert(weight: torch.Tensor, scale: torch.Tensor | None,
                      zero: torch.Tensor | None) -> torch.Tensor:
    """One expert's float32 weight [N, K] from its stored form (module docstring): int8 with a
    scale per row, or packed int4 with a scale and zero per group."""
    if zero is None:
        return dequantize_w8(weight, scale)
    group = 2 * weight.shape[-1] // scale.shape[-1]
    return dequantize_w4(weight, scale, zero, group)
