"""Weights of a Hugging Face style directory: safetensors (single or sharded) or PyTorch pickles."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from soarllm.errors import ConfigError
from soarllm.model.loader.checkpoint import cast

SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class SafetensorsSource:
    files: tuple[Path, ...]

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for file in self.files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    yield name, cast(f.get_tensor(name), dtype)


@dataclass(frozen=True)
class TorchPickleSource:
    """pytorch_model*.bin / *.pt, read with torch.load(weights_only=True): no code runs."""

    files: tuple[Path, ...]

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            state = _state_dict(_load_pickle(file), file)
            for name, tensor in state.items():
                yield name, cast(tensor, dtype)
            del state


def _load_pickle(file: Path) -> object:
    try:
        try:  # memory-map zip-format files (every torch.save since 1.6) instead of reading them
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"{file} holds objects other than tensors and is not loaded for safety; save only "
            f"model.state_dict(), or convert it to safetensors ({e})"
        ) from None


def _state_dict(obj: object, file: Path) -> Mapping[str, torch.Tensor]:
    """The tensor dict in a pickle: the object itself, or its 'state_dict' / 'model' entry."""
    candidates = [obj]
    if isinstance(obj, Mapping):
        candidates += [obj.get(key) for key in ("state_dict", "model", "module")]
    for cand in candidates:
        if (
            isinstance(cand, Mapping)
            and cand
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in cand.items())
        ):
            return cand
    raise ConfigError(
        f"{file} does not hold a state dict (a dict of tensor names to tensors, possibly under "
        "'state_dict' or 'model'); save it with torch.save(model.state_dict(), path)"
    )


def safetensors_files(directory: Path) -> tuple[Path, ...]:
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return _indexed_files(directory, index)
    return tuple(sorted(directory.glob("*.safetensors")))


def pickle_files(directory: Path) -> tuple[Path, ...]:
    index = directory / PT_INDEX
    if index.is_file():
        return _indexed_files(directory, index)
    files = sorted(directory.glob("pytorch_model*.bin")) or sorted(directory.glob("*.pt"))
    return tuple(files or sorted(directory.glob("*.bin")))


def _indexed_files(directory: Path, index: Path) -> tuple[Path, ...]:
    weight_map = json.loads(index.read_text())["weight_map"]
    files = tuple(directory / name for name in sorted(set(weight_map.values())))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(
            f"{index.name} lists shard(s) that are missing: {missing}; download them again"
        )
    return files


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)
