"""Linear layers. Each delegates storage, loading and math to a QuantMethod.

The layer's QuantMethod comes from the model's QuantizationConfig (by the layer's `prefix`, its
module name in the checkpoint), or is unquantized without one. Merged layers (QKV, gate/up) hold
several checkpoint tensors in one weight: each parameter's `weight_loader(param, loaded,
shard_id)` puts a shard into the rows its `shard_offsets` give. Tensor-parallel column/row
variants will wrap the same methods.
"""

from __future__ import annotations

import torch
from torch import nn

from soarllm.quant.base import QuantizationConfig, QuantMethod, UnquantizedMethod


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        quant_method: QuantMethod | None = None,
        *,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.prefix = prefix
        self.params_dtype = dtype
        if quant_method is None and quant_config is not None:
            quant_method = quant_config.get_quant_method(self, prefix)
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self, in_features, out_features, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    def checkpoint_param(self, suffix: str) -> nn.Parameter | None:
        """The parameter whose loader takes the checkpoint tensor `<prefix>.<suffix>`."""
        name = self.quant_method.checkpoint_params.get(suffix)
        return getattr(self, name, None) if name else None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.quant_method.describe()}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False, **kw):
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (off, size)
            off += size
        super().__init__(in_features, off, bias=bias, **kw)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        return list(out.split([s for _, s in self.shard_offsets.values()], dim=-1))
