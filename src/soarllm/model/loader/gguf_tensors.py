"""GGUF tensors as HF tensors: names from gguf's own tables, values dequantized and un-permuted."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.model.layers.fused_moe import EXPERT_SHARDS, EXPERT_TENSOR
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


@dataclass(frozen=True)
class HFTarget:
    """Where a GGUF tensor goes: an HF tensor name and shape; `part` "gate" / "up" when it is one
    half of a layer's stacked experts ``gate_up_proj`` (the other half is another GGUF tensor)."""

    name: str
    shape: tuple[int, ...]
    part: str | None = None


def gguf_to_hf_names(arch: str, config: PretrainedConfig) -> dict[str, HFTarget]:
    """GGUF tensor name -> its HF target, for every tensor the HF model of `config` holds.

    gguf's TensorNameMap knows, per architecture, the HF module names of each GGUF tensor; asking
    it for each name transformers' model holds picks the right one among its aliases. llama.cpp
    stacks the experts of a layer per projection (``ffn_gate_exps`` [E, I, H], ``ffn_up_exps``,
    ``ffn_down_exps`` [E, H, I]); the table knows them by the per-expert name without its index
    (``...experts.w1``), and they become transformers 5's stacked ``experts.gate_up_proj``
    [E, 2I, H] (gate rows, then up rows) and ``experts.down_proj``, which FusedMoE loads whole.
    """
    import gguf

    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        raise UnsupportedModelError(f"gguf {gguf.__version__} does not know architecture {arch!r}")
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    targets: dict[str, HFTarget] = {}
    for hf_name, (shape, _) in expected_tensors(config).items():
        expert = EXPERT_TENSOR.match(hf_name)
        lookup = hf_name if expert is None else f"{expert['module']}.{expert['proj']}.weight"
        gguf_name = name_map.get_name(lookup, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedModelError(
                f"no GGUF tensor name for {hf_name!r} ({arch} architecture)"
            )
        if expert is None:
            targets[gguf_name] = HFTarget(hf_name, tuple(shape))
        elif gguf_name not in targets:
            part = EXPERT_SHARDS[expert["proj"]]
            stacked = f"{expert['module']}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
            targets[gguf_name] = HFTarget(stacked, (config.num_experts, *shape),
                                          None if part == "down" else part)
    return targets


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
    targets = gguf_to_hf_names(arch, config)
    _check_complete(targets, (t.name for t in reader.tensors))

    def converted():
        bar = tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress)
        for tensor in bar:
            target = targets.get(tensor.name)
            if target is None:
                logger.warning("skipping GGUF tensor %s: the HF model has no such weight",
                               tensor.name)
                continue
            values = dequantize(tensor.data, tensor.tensor_type)
            yield target, "F32", _to_hf(arch, tensor, values, config, target=target)

    for name, _, weight in _join_gate_up(converted()):
        yield name, weight


def hf_packed_tensors(
    reader: GGUFReader, config: PretrainedConfig
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Every tensor as (HF name, GGML type name, tensor in HF row order), quantized ones kept as
    stored: uint8 [rows, bytes per row] of blocks, stacked experts of a 4-bit type uint8
    [experts, rows, bytes per row] (FusedMoE's W4A16 experts repack them exactly). Float and
    1-D tensors come dequantized (float32), and so do stacked experts of other types (FusedMoE
    holds them in the model dtype)."""
    from gguf.quants import dequantize

    from soarllm.quant.gguf import INT4_TYPES

    arch = gguf_architecture(reader)
    targets = gguf_to_hf_names(arch, config)
    _check_complete(targets, (t.name for t in reader.tensors))

    def converted():
        for tensor in reader.tensors:
            target = targets.get(tensor.name)
            if target is None:
                logger.warning("skipping GGUF tensor %s: the HF model has no such weight",
                               tensor.name)
                continue
            qtype = tensor.tensor_type.name
            blocks = tensor.data.ndim == 2 or (tensor.data.ndim == 3 and qtype in INT4_TYPES)
            if qtype in ("F32", "F16", "BF16", "F64") or not blocks:
                values = dequantize(tensor.data, tensor.tensor_type)
                yield target, "F32", _to_hf(arch, tensor, values, config, target=target)
            else:  # rows of blocks: only the row order changes
                yield target, qtype, _to_hf(arch, tensor, tensor.data, config, dtype=torch.uint8)

    yield from _join_gate_up(converted())


def _join_gate_up(
    items: Iterable[tuple[HFTarget, str, torch.Tensor]],
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(HF name, type, tensor) for each target; a layer's stacked gate and up experts ([E, I, H]
    floats, or [E, I, bytes] of blocks) are held until both are read and come as one
    gate_up_proj [E, 2I, ...]; halves of different types both dequantized."""
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for target, qtype, tensor in items:
        if target.part is None:
            yield target.name, qtype, tensor
            continue
        pair = halves.setdefault(target.name, {})
        pair[target.part] = (qtype, tensor)
        if len(pair) == 2:
            del halves[target.name]
            (gate_type, gate), (up_type, up) = pair["gate"], pair["up"]
            if gate_type != up_type:
                gate_type, gate, up = "F32", _dequantized(gate_type, gate), _dequantized(up_type, up)
            yield target.name, gate_type, torch.cat([gate, up], dim=1)
    if halves:
        raise ConfigError(f"the GGUF file holds only one of the gate / up expert stacks of "
                          f"{sorted(halves)[:3]}; it may be a partial file")


def _dequantized(qtype: str, tensor: torch.Tensor) -> torch.Tensor:
    """float32 values of a stack of blocks (uint8 [E, rows, bytes]); floats as they are."""
    if qtype == "F32":
        return tensor
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = dequantize(tensor.numpy(), GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def _to_hf(arch: str, tensor: ReaderTensor, values, config: PretrainedConfig,
           dtype: torch.dtype = torch.float32, target: HFTarget | None = None) -> torch.Tensor:
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
    if target is not None and tuple(weight.shape) != target.shape:
        # llama.cpp's converter squeezes size-1 dims (Qwen2-MoE's shared_expert_gate [1, H]
        # is stored as [H]); any other difference is a file that does not fit its config
        if weight.numel() != torch.Size(target.shape).numel():
            raise ConfigError(
                f"GGUF tensor {tensor.name} has shape {tuple(weight.shape)}, but the file's "
                f"config makes {target.name} {target.shape}; the file's metadata and tensors "
                "disagree (a broken conversion)")
        weight = weight.reshape(target.shape)
    return weight


def _check_complete(names: dict[str, HFTarget], present: Iterable[str]) -> None:
    missing = sorted(set(names) - set(present))
    if missing:
        raise ConfigError(
            f"the GGUF file lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}; "
            "it may be a partial or adapter file"
        )
