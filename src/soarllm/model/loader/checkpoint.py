"""The loaded checkpoint: its config, where its tokenizer lives and a lazy stream of its weights."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from soarllm.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class WeightSource(Protocol):
    """Yields (HF tensor name, CPU tensor in `dtype`) pairs; reads nothing before it is iterated."""

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass
class Checkpoint:
    path: Path  # directory or .gguf file actually loaded
    format: str  # "safetensors" | "gguf" | "pt" | "dummy"
    config: PretrainedConfig  # text-only HF config with `architectures` set
    tokenizer_dir: Path | None  # loadable with AutoTokenizer.from_pretrained, None if none
    source: WeightSource | None = field(default=None, repr=False, compare=False)

    def weights(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named tensors on the CPU; floating-point ones converted to `dtype`."""
        if self.source is None:
            raise ConfigError(
                f"checkpoint {self.path} carries no weights; load it with load_checkpoint"
            )
        return self.source.tensors(dtype)


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Convert floating-point tensors to `dtype`; integer and bool tensors keep theirs."""
    if tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor
