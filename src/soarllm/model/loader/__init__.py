"""Checkpoint loading: any supported source -> HF config, tokenizer directory and HF-named weights.

Sources: a registry name (see soarllm.hub), a local HF directory (safetensors, single or sharded,
or PyTorch pickles), a .gguf file (converted once into a cache), a hub id, or, with
load_format="dummy", just a config (random weights).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soarllm.errors import ConfigError
from soarllm.model.loader.checkpoint import Checkpoint, WeightSource
from soarllm.model.loader.dummy import RandomSource
from soarllm.model.loader.hf_files import (
    SafetensorsSource,
    TorchPickleSource,
    has_tokenizer,
    pickle_files,
    safetensors_files,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["Checkpoint", "WeightSource", "LOAD_FORMATS", "load_checkpoint"]

LOAD_FORMATS = ("auto", "safetensors", "gguf", "pt", "dummy")


def load_checkpoint(
    model: str | Path | PretrainedConfig,
    load_format: str = "auto",
    hf_overrides: dict[str, Any] | None = None,
    *,
    seed: int = 0,
) -> Checkpoint:
    """Resolve `model` and return its Checkpoint; no weight is read until `weights()` runs.

    `hf_overrides` are set on the config (e.g. {"num_hidden_layers": 2} for a small dummy model).
    `seed` seeds the random weights of load_format="dummy".
    """
    if load_format not in LOAD_FORMATS:
        raise ConfigError(
            f"unknown load_format {load_format!r}; use one of {', '.join(LOAD_FORMATS)}"
        )
    if load_format == "dummy":
        checkpoint = _dummy(model, seed)
    else:
        if not isinstance(model, str | Path):
            raise ConfigError(
                "a config alone has no weights: pass load_format='dummy' for random weights, "
                "or give a model name or path"
            )
        checkpoint = _real(_resolve(model), load_format)
    if hf_overrides:
        for key, value in hf_overrides.items():
            setattr(checkpoint.config, key, value)
    _check_config(checkpoint.config, checkpoint.path)
    return checkpoint


def _resolve(model: str | Path) -> Path:
    from soarllm.hub import resolve_model

    return resolve_model(str(model))


def _real(path: Path, load_format: str) -> Checkpoint:
    if path.is_file() and path.suffix == ".gguf":
        if load_format not in ("auto", "gguf"):
            raise ConfigError(f"{path} is a GGUF file; use load_format='gguf' or 'auto'")
        return _gguf(path)
    if path.is_file():
        raise ConfigError(
            f"{path} is a file but not a .gguf; give the directory holding config.json and the weights"
        )
    if load_format == "gguf" or (load_format == "auto" and not (path / "config.json").is_file()):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf(ggufs[0])
        if load_format == "gguf":
            raise ConfigError(f"{path} holds {len(ggufs)} .gguf files; give the path of one")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path} has no config.json; give a Hugging Face model directory or a .gguf file"
        )
    config = _auto_config(path)
    tokenizer_dir = path if has_tokenizer(path) else None
    if load_format in ("auto", "safetensors"):
        files = safetensors_files(path)
        if files:
            return Checkpoint(path, "safetensors", config, tokenizer_dir, SafetensorsSource(files))
    if load_format in ("auto", "pt"):
        files = pickle_files(path)
        if files:
            return Checkpoint(path, "pt", config, tokenizer_dir, TorchPickleSource(files))
    wanted = "*.safetensors or pytorch_model*.bin / *.pt" if load_format == "auto" else load_format
    raise ConfigError(f"{path} has no {wanted} weights; check the directory or the load_format")


def _gguf(path: Path) -> Checkpoint:
    from soarllm.model.loader.gguf_blocks import GGUFBlockSource
    from soarllm.model.loader.gguf_cache import ensure_converted

    directory = ensure_converted(path)
    files = safetensors_files(directory)
    return Checkpoint(path, "gguf", _auto_config(directory), directory, SafetensorsSource(files),
                      packed_source=GGUFBlockSource(path))


def _dummy(model: str | Path | PretrainedConfig, seed: int) -> Checkpoint:
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        config = copy.deepcopy(model)
        return Checkpoint(Path("."), "dummy", config, None, RandomSource(config, seed))
    path = _resolve(model)
    if path.is_file() and path.suffix == ".json":
        config, tokenizer_dir = (
            _auto_config(path),
            (path.parent if has_tokenizer(path.parent) else None),
        )
    elif path.is_file() or not (path / "config.json").is_file():
        config, tokenizer_dir = _gguf_config_only(path)
    else:
        config, tokenizer_dir = _auto_config(path), (path if has_tokenizer(path) else None)
    return Checkpoint(path, "dummy", config, tokenizer_dir, RandomSource(config, seed))


def _gguf_config_only(path: Path) -> tuple[PretrainedConfig, Path | None]:
    """Config (and tokenizer, when converted before) of a GGUF, without reading its tensors."""
    from soarllm.hub import cached_conversion

    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ConfigError(f"{path} has no config.json and not exactly one .gguf file")
        path = ggufs[0]
    if path.suffix != ".gguf":
        raise ConfigError(f"{path} is neither a config.json, a model directory nor a .gguf file")
    directory = cached_conversion(path)
    if directory is not None:
        return _auto_config(directory), directory
    from gguf import GGUFReader

    from soarllm.model.loader.gguf_config import config_from_gguf

    return config_from_gguf(GGUFReader(path)), None


def _auto_config(path: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"cannot read the model config in {path}: {e}") from None


def _check_config(config: PretrainedConfig, path: Path) -> None:
    """Every config leaves here with `architectures`, inferred from model_type when absent."""
    if getattr(config, "architectures", None):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if causal_lm:
        config.architectures = [causal_lm]
    else:
        raise ConfigError(
            f"the config of {path} has no 'architectures' entry; add e.g. "
            '"architectures": ["LlamaForCausalLM"] to its config.json or pass hf_overrides'
        )
