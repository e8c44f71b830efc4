"""GGUF tensors as HF tensors: names from gguf's own tables, values dequantized and un-permuted."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.model.loader.gguf_config import gguf_architecture
from soarllm.model.loader.layout import expected_tensors

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# llama.cpp's converter permutes the q/k rows of these architectures (LlamaModel.permute) so that
# its rope rotates adjacent pairs; HF rotates the two halves of each head.
PERMUTED_QK_ARCHS = frozenset({"llama"})
# ... and stores Gemma's norm weights w as 1 + w, the factor Gemma's RMSNorm applies.
SHIFTED_NORM_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})


def gguf_to_hf_names(arch: str, config: PretrainedConfig) -> dict[str, str]:
    """GGUF tensor name -> HF tensor name, for every tensor the HF model of `config` holds.

    gguf's TensorNameMap knows, per architecture, the HF module names of each GGUF tensor; asking
    it for each name transformers' model holds picks the right one among its aliases.
    """
    import gguf

    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        raise UnsupportedModelError(f"gguf {gguf.__version__} does not know architecture {arch!r}")
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    mapping: dict[str, str] = {}
    for hf_name in expected_tensors(config):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedModelError(
                f"no GGUF tensor name for {hf_name!r} ({arch} architecture)"
            )
        mapping[gguf_name] = hf_name
    return mapping


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    Per head, llama.cpp reorders the rows [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] (HF: rope rotates
    the pairs (x_i, y_i) across the two halves) into [x_0, y_0, x_1, y_1, ...] (pairs adjacent).
    So the rows of a head, seen as (d/2, 2), are transposed back to (2, d/2).
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def hf_tensors(
    reader: GGUFReader, config: PretrainedConfig, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the GGUF file as (HF name, float32 tensor in HF layout)."""
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    arch = gguf_architecture(reader)
    names = gguf_to_hf_names(arch, config)
    _check_complete(names, (t.name for t in reader.tensors))
    bar = tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress)
    for tensor in bar:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            logger.warning("skipping GGUF tensor %s: the HF model has no such weight", tensor.name)
            continue
        yield hf_name, _to_hf(arch, tensor, dequantize(tensor.data, tensor.tensor_type), config)


def hf_packed_tensors(
    reader: GGUFReader, config: PretrainedConfig
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Every tensor as (HF name, GGML type name, tensor in HF row order), quantized ones kept as
    stored: uint8 [rows, bytes per row] of blocks. Float and 1-D tensors come dequantized (float32).
    """
    from gguf.quants import dequantize

    arch = gguf_architecture(reader)
    names = gguf_to_hf_names(arch, config)
    _check_complete(names, (t.name for t in reader.tensors))
    for tensor in reader.tensors:
        hf_name = names.get(tensor.name)
        if hf_name is None:
            logger.warning("skipping GGUF tensor %s: the HF model has no such weight", tensor.name)
            continue
        qtype = tensor.tensor_type.name
        if qtype in ("F32", "F16", "BF16", "F64") or tensor.data.ndim != 2:
            yield hf_name, "F32", _to_hf(arch, tensor, dequantize(tensor.data, tensor.tensor_type), config)
        else:  # rows of blocks: only the row order changes
            yield hf_name, qtype, _to_hf(arch, tensor, tensor.data, config, dtype=torch.uint8)


def _to_hf(arch: str, tensor: ReaderTensor, values, config: PretrainedConfig,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # dequantize returns numpy's (rows, cols) order, the reverse of GGUF's ne[]; F32 data comes
    # back as a view of the memory-mapped file, so copy.
    weight = torch.tensor(values, dtype=dtype)
    if arch in PERMUTED_QK_ARCHS:
        if tensor.name.endswith("attn_q.weight") or tensor.name.endswith("attn_q.bias"):
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif tensor.name.endswith("attn_k.weight") or tensor.name.endswith("attn_k.bias"):
            weight = unpermute_qk(weight, config.num_key_value_heads)
    if arch in SHIFTED_NORM_ARCHS and tensor.name.endswith("norm.weight") and dtype != torch.uint8:
        weight -= 1.0
    return weight


def _check_complete(names: dict[str, str], present: Iterable[str]) -> None:
    missing = sorted(set(names) - set(present))
    if missing:
        raise ConfigError(
            f"the GGUF file lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}; "
            "it may be a partial or adapter file"
        )
