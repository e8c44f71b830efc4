"""A GGUF file's tensors as stored (quantized blocks), for serving it quantized.

Parsing a GGUF file takes seconds (its vocabulary), so the first quantized load writes the
tensors once into `gguf-blocks.safetensors` beside the conversion cache (gguf_cache.py) and later
loads memory-map that file: quantized tensors as uint8 [rows, bytes per row] of blocks (stacked
experts of a 4-bit type [experts, rows, bytes per row]) under HF names, with llama.cpp's q/k row permutation already undone (it moves whole rows, so blocks stay
intact), float tensors (norms) as float32 in HF form. The safetensors metadata names each
tensor's GGML type and shape. The file is written under a temporary name and renamed: it exists
whole or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from soarllm.errors import ConfigError
from soarllm.model.loader.checkpoint import cast

BLOCKS_FILE = "gguf-blocks.safetensors"
_META_KEY = "soarllm.gguf_types"

logger = logging.getLogger(__name__)


def ensure_blocks(gguf_path: Path) -> Path:
    """The packed-tensor file of `gguf_path` (in its conversion cache), written first if missing."""
    from soarllm.model.loader.gguf_cache import ensure_converted

    target = ensure_converted(gguf_path) / BLOCKS_FILE
    if target.is_file():
        return target
    start = time.perf_counter()
    tmp = target.with_name(f".tmp-{os.getpid()}-{BLOCKS_FILE}")
    try:
        _write_blocks(gguf_path, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("stored the quantized blocks of %s in %.1fs (once)", gguf_path.name,
                time.perf_counter() - start)
    return target


def _write_blocks(gguf_path: Path, out: Path) -> None:
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from soarllm.hub import cached_conversion
    from soarllm.model.loader.gguf_tensors import hf_packed_tensors

    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot read {gguf_path} as GGUF ({e}); is the file complete?") from None
    config = AutoConfig.from_pretrained(str(cached_conversion(gguf_path)))
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, list] = {}
    for name, qtype, tensor in hf_packed_tensors(reader, config):
        tensors[name] = tensor
        if qtype != "F32":
            types[name] = [qtype, *_logical_shape(tensor, qtype)]
    save_file(tensors, str(out), metadata={"format": "pt", _META_KEY: json.dumps(types)})


def _logical_shape(tensor: torch.Tensor, qtype: str) -> tuple[int, ...]:
    """The weight's shape: ([experts,] rows, cols) of a tensor of blocks [.., rows, bytes]."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    *lead, nbytes = tensor.shape
    return (*lead, nbytes // type_size * block_size)


@dataclass(frozen=True)
class GGUFBlockSource:
    """Yields GGUFBlocks for quantized tensors, float tensors in `dtype` for the rest."""

    gguf_path: Path

    def _file(self) -> Path:
        return ensure_blocks(self.gguf_path)

    def types(self) -> dict[str, str]:
        """HF tensor name -> GGML type name of every quantized tensor."""
        return {name: t[0] for name, t in self._read_types(self._file()).items()}

    @staticmethod
    def _read_types(file: Path) -> dict[str, list]:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {}).get(_META_KEY, "{}"))

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, object]]:
        from safetensors import safe_open

        from soarllm.quant.gguf import GGUFBlocks

        file = self._file()
        types = self._read_types(file)
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                tensor = f.get_tensor(name)
                if name in types:
                    qtype, *shape = types[name]
                    yield name, GGUFBlocks(qtype, tensor, tuple(shape))
                else:
                    yield name, cast(tensor, dtype)
