"""The QuantMethod interface every Linear delegates to; unquantized is one method among them.

A QuantMethod creates a layer's parameters, loads checkpoint tensors into them, turns them into
the kernel's layout once everything is loaded, and applies the layer. Each parameter it creates
carries a ``weight_loader(param, loaded, shard_id)`` (vLLM's pattern): the model routes every
checkpoint tensor to the loader of the parameter that owns it, with ``shard_id`` naming the part
of a merged layer ("q", "k", "v", "gate", "up") or None for the whole layer.

A QuantizationConfig decides, per layer, which QuantMethod the layer gets.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from soarllm.model.loader.checkpoint import Checkpoint


class QuantMethod:
    """How a linear layer stores and applies its weight."""

    # checkpoint tensor suffix -> name of the layer parameter whose weight_loader takes it
    checkpoint_params: dict[str, str] = {"weight": "weight", "bias": "bias"}
    # as a tied LM head: rows of logits it computes itself before the dequantized embedding table
    # is faster (None: the model's default, models/base.QUANTIZED_HEAD_MAX_ROWS)
    tied_head_max_rows: int | None = None

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, bias: bool, dtype: torch.dtype
    ) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def prepare_compiled(self, layer: nn.Module) -> None:
        """Before the model step is compiled (once per layer): load what compiled code calls
        (e.g. a kernel registered as a C++ operator)."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class QuantizationConfig:
    """Chooses each layer's QuantMethod; `None` in place of a config means unquantized."""

    name: str = "none"
    # True: the model loads the checkpoint's tensors as stored (e.g. GGUF blocks), not floats
    loads_packed: bool = False
    # True: every method loads a tensor-parallel rank's slice of each checkpoint tensor (float
    # weights rounded at load per slice, or stored blocks cut on block boundaries)
    splits_over_ranks: bool = False

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod:
        raise NotImplementedError

    def get_moe_method(self, layer: nn.Module, prefix: str):
        """How a FusedMoE layer stores its experts (a quant/moe.py method); None: in the model
        dtype, as a config that knows no expert format leaves them."""
        return None

    def weights(self, checkpoint: Checkpoint, dtype: torch.dtype):
        """The checkpoint's tensor stream this config's methods load from."""
        return checkpoint.weights(dtype)

    def summary(self) -> str:
        return self.name


def set_weight_loader(param: nn.Parameter, loader) -> nn.Parameter:
    param.weight_loader = loader
    return param


def new_param(shape, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


def as_float(loaded) -> torch.Tensor:
    """A checkpoint tensor as a float tensor: stored blocks (GGUF) are dequantized exactly."""
    dequantize = getattr(loaded, "dequantize", None)
    return dequantize() if dequantize is not None else loaded


def shard_range(layer: nn.Module, shard_id: str | None, total: int) -> tuple[int, int]:
    """(first row, rows) of `shard_id` in a merged layer, or the whole layer."""
    if shard_id is None:
        return 0, total
    return layer.shard_offsets[shard_id]


def check_rows(name: str, shard_id: str | None, expected: tuple, got: tuple) -> None:
    if tuple(expected) != tuple(got):
        part = f" shard {shard_id!r}" if shard_id else ""
        raise ValueError(f"{name}{part}: checkpoint shape {tuple(got)} != expected {tuple(expected)}")


def load_rows(layer: nn.Module, param: nn.Parameter, loaded, shard_id: str | None = None) -> None:
    """Copy a float tensor (or dequantized blocks) into the rows of `param` its shard owns."""
    tensor = as_float(loaded)
    off, size = shard_range(layer, shard_id, param.shape[0])
    check_rows("weight" if param.dim() > 1 else "bias", shard_id, (size, *param.shape[1:]),
               tensor.shape)
    param.data[off : off + size].copy_(tensor)


def default_weight_loader(param: nn.Parameter, loaded, shard_id: str | None = None) -> None:
    """Whole-tensor copy, for parameters outside linear layers (embeddings, norms)."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} has no shard {shard_id!r}")
    tensor = as_float(loaded)
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
    param.data.copy_(tensor)


class UnquantizedMethod(QuantMethod):
    """Weights in the model dtype, F.linear; stored blocks load dequantized."""

    def create_weights(self, layer, in_features, out_features, bias, dtype):
        loader = functools.partial(load_rows, layer)
        layer.weight = set_weight_loader(new_param((out_features, in_features), dtype), loader)
        layer.bias = set_weight_loader(new_param((out_features,), dtype), loader) if bias else None

    def apply(self, layer, x):
        return F.linear(x, layer.weight, layer.bias)

    def describe(self) -> str:
        return "unquantized"
