"""Linear layers. Each delegates storage and math to a QuantMethod.

Merged layers (QKV, gate/up) hold several checkpoint tensors in one weight; ``load_shard`` copies one
of them into its rows. Tensor-parallel column/row variants will wrap the same method.
"""

from __future__ import annotations

import torch
from torch import nn

from soarllm.quant.base import QuantMethod, UnquantizedMethod


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        quant_method: QuantMethod | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self, in_features, out_features, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False, **kw):
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (off, size)
            off += size
        super().__init__(in_features, off, bias=bias, **kw)

    def load_shard(self, param_name: str, shard: str, tensor: torch.Tensor) -> None:
        off, size = self.shard_offsets[shard]
        param = getattr(self, param_name)
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard!r} expects {size} rows, checkpoint has {tensor.shape[0]}")
        param.data[off : off + size].copy_(tensor)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        return list(out.split([s for _, s in self.shard_offsets.values()], dim=-1))
