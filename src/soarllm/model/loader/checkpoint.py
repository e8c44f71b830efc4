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
    # the tensors as stored when the file is quantized (GGUF blocks); None for float checkpoints
    packed_source: WeightSource | None = field(default=None, repr=False, compare=False)

    def weights(
        self, dtype: torch.dtype = torch.float32, packed: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named tensors on the CPU; floating-point ones converted to `dtype`.

        With `packed`, quantized tensors come as stored (soarllm.quant.gguf.GGUFBlocks objects)
        for the layers to repack; without, everything comes dequantized.
        """
        source = self.packed_source if packed else self.source
        if source is None:
            what = "quantized tensors to keep packed" if packed else "weights"
            raise ConfigError(f"checkpoint {self.path} carries no {what}; load it with load_checkpoint")
        return source.tensors(dtype)

    def packed_types(self) -> dict[str, str]:
        """HF tensor name -> stored quantized type (e.g. "Q4_1") of each quantized tensor."""
        if self.packed_source is None:
            return {}
        return self.packed_source.types()


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Convert floating-point tensors to `dtype`; integer and bool tensors keep theirs."""
    if tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor
