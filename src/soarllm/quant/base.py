"""The QuantMethod interface every Linear delegates to; unquantized is one method among them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantMethod:
    """How a linear layer stores and applies its weight."""

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, bias: bool, dtype: torch.dtype
    ) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedMethod(QuantMethod):
    def create_weights(self, layer, in_features, out_features, bias, dtype):
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        layer.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def apply(self, layer, x):
        return F.linear(x, layer.weight, layer.bias)
