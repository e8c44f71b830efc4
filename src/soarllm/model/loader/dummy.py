"""Random weights for any config (`--load-format dummy`): benchmarks without a weight file.

Each tensor is made only when the iterator reaches it, directly in the asked dtype, from a seed
derived from its name: the same config and seed give the same weights in any order, on any rank.
The runner sets ``device`` to its own so a large model's random weights are drawn where they will
live (an 8B model drawn on the CPU takes most of a minute; on a GPU, a second); the same seed gives
other numbers on another device type.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from soarllm.model.loader.layout import expected_tensors

if TYPE_CHECKING:
    from transformers import PretrainedConfig

INIT_STD = 0.02


@dataclass(frozen=True)
class RandomSource:
    config: PretrainedConfig
    seed: int = 0
    device: str = "cpu"

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        # Gemma norms scale by (1 + weight): zeros are their identity, ones everyone else's.
        norm_value = 0.0 if self.config.model_type.startswith("gemma") else 1.0
        for name, (shape, _) in expected_tensors(self.config).items():
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
            if _is_norm(name):
                tensor.fill_(norm_value)
            elif name.endswith(".bias"):
                tensor.zero_()
            else:
                generator = torch.Generator(self.device).manual_seed(self.seed + zlib.crc32(name.encode()))
                tensor.normal_(0.0, INIT_STD, generator=generator)
            yield name, tensor


def _is_norm(name: str) -> bool:
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return "norm" in module and name.endswith(".weight")
