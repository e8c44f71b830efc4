"""GGUF served quantized: llama.cpp's 4-bit blocks repacked into the W4A16 kernel at load.

Each of these block types is exactly a group-32 asymmetric int4 layout, w = (q - 8) * s + z:

    Q4_0  (32 weights: fp16 d, 16 bytes of nibbles)   w = d * (q - 8)      s = d,       z = 0
    Q4_1  (32 weights: fp16 d, fp16 m, 16 bytes)      w = d * q + m        s = d,       z = m + 8d
    Q4_K  (256 weights: fp16 d, dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes)
          eight sub-blocks of 32, w = d*sc * q - dmin*mn    s = d*sc,  z = 8 d*sc - dmin*mn

so repacking them loses nothing but float rounding (z is computed in float32). In all three the
first 16 weights of a 32-weight run are the low nibbles of 16 bytes and the next 16 their high
nibbles.

Q8_0 (32 weights: fp16 d, 32 int8 q, w = d * q) is group-32 symmetric int8, which the per-channel
W8A16 kernel cannot hold without re-rounding; it is exactly two int4 planes instead. With
q = 16 h + l (h = floor(q / 16) in [-8, 8), l in [0, 16)):

    w = d q = (16 d) h + d l = [(h + 8) - 8] (16 d)  +  [(l - 8) d + 8 d]

so a layer of K inputs becomes one W4A16 layer of 2K inputs (plane h with s = 16 d, z = 0; plane l
with s = d, z = 8 d) applied to [x, x]: the same bytes as int8, through the int4 kernel (the
default model's tied Q8_0 LM head reads half the bytes of its bfloat16 copy). Only in bfloat16
models: the CPU kernel rounds activations to bfloat16, which a float32 model's dequantized Q8_0
layer does not. Other types (Q5_x,
Q6_K, ...) have no exact 4-bit form: their layers load dequantized to the model dtype (gguf's own
dequantize), named in the config's summary line.

Activations: on CPUs with AVX-512 VNNI or AVX2 these layers multiply as llama.cpp does, with the
activations quantized to int8 per 32 inputs (quant/vnni.py; 1.3-1.5x the bfloat16 int4
kernel's speed from 16 rows, benchmarks/results/cpu_vnni); SOARLLM_W4A16_CPU=torch keeps bfloat16 activations.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from soarllm.errors import ConfigError
from soarllm.quant import vnni
from soarllm.quant.base import (
    QuantizationConfig,
    QuantMethod,
    UnquantizedMethod,
    check_rows,
    load_rows,
    new_param,
    set_weight_loader,
    shard_range,
)
from soarllm.quant.w4a16 import KERNEL_DTYPE, W4A16Method, int8_activations_by_default

logger = logging.getLogger(__name__)

FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
GROUP = 32


@dataclass
class GGUFBlocks:
    """One GGUF tensor as stored: `data` is uint8 [rows, bytes per row] of `qtype` blocks."""

    qtype: str  # GGMLQuantizationType name, e.g. "Q4_1"
    data: torch.Tensor
    # (rows, cols) of the weight, HF layout (out, in); stacked experts (experts, rows, cols), data
    # uint8 [experts, rows, bytes per row]
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        """float32 weight, by gguf's own dequantize (the oracle of the repack)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(self.data.numpy(), GGMLQuantizationType[self.qtype])
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(self.shape)

    def narrow(self, dim: int, start: int, size: int) -> GGUFBlocks | None:
        """The blocks of [start, start + size) along ``dim`` (rows, stacked experts, or columns
        on block boundaries), still blocks: a tensor-parallel rank's slice, loaded as the whole
        tensor would be; rows past the end (a vocabulary padded to the ranks) are zero bytes,
        which every block type reads as zero weights. None where columns would be cut through a
        block or run past the end: the caller takes them from the dequantized tensor."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        dim %= len(self.shape)
        shape = (*self.shape[:dim], size, *self.shape[dim + 1:])
        if dim < len(self.shape) - 1:  # rows (or experts); past the end, rows of zero bytes
            avail = max(0, min(size, self.shape[dim] - start))  # (a zero scale: zero weights)
            data = self.data.narrow(dim, min(start, self.shape[dim]), avail)
            if avail < size:
                pad = list(data.shape)
                pad[dim] = size - avail
                data = torch.cat([data, data.new_zeros(pad)], dim=dim)
            return GGUFBlocks(self.qtype, data, shape)
        if start < 0 or start + size > self.shape[dim]:
            return None
        per_block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[self.qtype]]
        if start % per_block or size % per_block:
            return None
        lo, n = start // per_block * nbytes, size // per_block * nbytes
        return GGUFBlocks(self.qtype, self.data.narrow(dim, lo, n).contiguous(), shape)

    @staticmethod
    def concat(parts: list[GGUFBlocks], dim: int) -> GGUFBlocks:
        """Blocks of one type side by side along a dimension other than the columns."""
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        return GGUFBlocks(parts[0].qtype, torch.cat([p.data for p in parts], dim=dim),
                          tuple(shape))

    def to_int4(self, group_size: int = GROUP):
        """(q uint8 [.., rows, cols], scale f32 [.., rows, cols/32], zero f32) with
        w = (q - 8) s + z (leading dim: stacked experts)."""
        if group_size != GROUP or self.qtype not in INT4_TYPES:
            raise ValueError(f"{self.qtype} blocks have no exact group-{group_size} int4 form")
        *lead, rows, cols = self.shape
        flat = int(np.prod(lead, dtype=np.int64)) * rows
        q, scale, zero = _REPACK[self.qtype](self.data.numpy(), flat, cols)
        return (q.reshape(*lead, rows, cols), scale.reshape(*lead, rows, cols // GROUP),
                zero.reshape(*lead, rows, cols // GROUP))

    def to_uint8(self):
        """Q8_0 as unsigned bytes: (u uint8 [rows, cols] = q + 128, scale f32 [rows, cols / 32])
        with w = u * scale - 128 * scale, exactly."""
        if self.qtype != "Q8_0":
            raise ValueError(f"{self.qtype} blocks are not Q8_0")
        q, d = self._q8_0()
        return torch.from_numpy((q + 128).astype(np.uint8)), torch.from_numpy(d)

    def _q8_0(self):
        """Q8_0 blocks as (q int16 [rows, cols], d float32 [rows, cols / 32]), w = d * q."""
        rows, cols = self.shape
        blocks = self.data.numpy().reshape(-1, 34)
        d = _f16(blocks[:, 0:2])[:, 0].reshape(rows, cols // GROUP)
        q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.int16).reshape(rows, cols)
        return q, d

    def to_int4_planes(self, group_size: int = GROUP):
        """Q8_0 as two int4 planes side by side: (q uint8 [rows, 2 cols], scale, zero f32
        [rows, 2 cols / 32]) with w = plane h + plane l (module docstring)."""
        if group_size != GROUP or self.qtype != "Q8_0":
            raise ValueError(f"{self.qtype} blocks have no exact pair of group-{group_size} int4 planes")
        q, d = self._q8_0()
        h = np.floor_divide(q, 16)
        q4 = np.concatenate([h + 8, q - 16 * h], axis=1).astype(np.uint8)
        scale = np.concatenate([16 * d, d], axis=1)
        zero = np.concatenate([np.zeros_like(d), 8 * d], axis=1)
        return torch.from_numpy(q4), torch.from_numpy(scale), torch.from_numpy(zero)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: the low nibbles, then the high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _result(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, rows: int, cols: int):
    return (
        torch.from_numpy(np.ascontiguousarray(q.reshape(rows, cols))),
        torch.from_numpy(np.ascontiguousarray(scale.reshape(rows, cols // GROUP))),
        torch.from_numpy(np.ascontiguousarray(zero.reshape(rows, cols // GROUP))),
    )


def _repack_q4_0(data: np.ndarray, rows: int, cols: int):
    blocks = data.reshape(-1, 18)
    d = _f16(blocks[:, 0:2])[:, 0]
    return _result(_nibbles(blocks[:, 2:]), d, np.zeros_like(d), rows, cols)


def _repack_q4_1(data: np.ndarray, rows: int, cols: int):
    blocks = data.reshape(-1, 20)
    d = _f16(blocks[:, 0:2])[:, 0]
    m = _f16(blocks[:, 2:4])[:, 0]
    return _result(_nibbles(blocks[:, 4:]), d, m + 8 * d, rows, cols)


def _repack_q4_k(data: np.ndarray, rows: int, cols: int):
    from gguf.quants import Q4_K

    blocks = data.reshape(-1, 144)
    d = _f16(blocks[:, 0:2])
    dmin = _f16(blocks[:, 2:4])
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    scale = d * sc.astype(np.float32)  # [n, 8]: one per 32-weight sub-block
    zero = 8 * scale - dmin * mn.astype(np.float32)
    # 128 bytes = 4 runs of 32 bytes; run i holds sub-block 2i (low nibbles) and 2i+1 (high)
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return _result(qs & 0x0F, scale, zero, rows, cols)


_REPACK = {"Q4_0": _repack_q4_0, "Q4_1": _repack_q4_1, "Q4_K": _repack_q4_k}


class Q8AsInt4PairMethod(W4A16Method):
    """A Q8_0 layer served exactly as one W4A16 layer over [x, x] (module docstring)."""

    def describe(self) -> str:
        return "Q8_0 as two W4A16 planes (group 32)"

    def create_weights(self, layer, in_features, out_features, bias, dtype):
        super().create_weights(layer, 2 * in_features, out_features, bias, dtype)

    def load_weight(self, layer, param, loaded, shard_id=None) -> None:
        off, size = shard_range(layer, shard_id, layer.out_features)
        check_rows("weight", shard_id, (size, layer.in_features), tuple(loaded.shape))
        self.store_rows(layer, off, *loaded.to_int4_planes(self.group_size))

    def apply(self, layer, x):
        return super().apply(layer, torch.cat([x, x], dim=-1))

    def weight_width(self, layer) -> int:
        return 2 * layer.in_features

    def dequantized_weight(self, layer) -> torch.Tensor:
        k = layer.in_features
        w = super().dequantized_weight(layer)  # [out, 2k]: the two planes side by side
        return w[:, :k] + w[:, k:]


class Q8VnniMethod(QuantMethod):
    """A Q8_0 layer kept as its int8 bytes and multiplied with int8 activations (quant/vnni.py,
    AVX-512 VNNI or AVX2): llama.cpp's Q8_0 x Q8_0 arithmetic, half the products of the two int4
    planes (``Q8AsInt4PairMethod``, which serves bfloat16 models where the kernel does not run).
    In a model of any dtype: the activations are quantized either way."""

    checkpoint_params = {"weight": "qweight", "bias": "bias"}
    # a tied head never hands over to the bfloat16 table: faster at every row count measured
    # (models/base.py's docstring)
    tied_head_max_rows = 1 << 30

    def describe(self) -> str:
        return f"Q8_0 as int8 with int8 activations ({vnni.isa()})"

    def create_weights(self, layer, in_features, out_features, bias, dtype):
        if in_features % GROUP:
            raise ConfigError(f"Q8_0 blocks of {GROUP} do not divide the layer's {in_features} inputs")
        layer.qweight = set_weight_loader(new_param((out_features, in_features), torch.uint8),
                                          functools.partial(self.load_weight, layer))
        layer.scales = new_param((out_features, in_features // GROUP), torch.float32)
        layer.scales.filled_by = "qweight"
        layer.bias = (set_weight_loader(new_param((out_features,), dtype),
                                        functools.partial(load_rows, layer)) if bias else None)

    def load_weight(self, layer, param, loaded, shard_id=None) -> None:
        off, size = shard_range(layer, shard_id, layer.out_features)
        check_rows("weight", shard_id, (size, layer.in_features), tuple(loaded.shape))
        u, d = loaded.to_uint8()
        layer.qweight.data[off : off + size] = u
        layer.scales.data[off : off + size] = d

    def process_weights_after_loading(self, layer) -> None:
        scales = layer.scales.data
        packed, scale_min = vnni.pack_vnni8(layer.qweight.data, scales, -128 * scales)
        layer.qweight = nn.Parameter(packed, requires_grad=False)
        layer.scale_min = nn.Parameter(scale_min, requires_grad=False)
        del layer.scales
        layer.cpu_layout = "vnni8"

    def apply(self, layer, x):
        out = vnni.linear(x, layer.qweight, layer.scale_min, layer.out_features)
        return out if layer.bias is None else out + layer.bias

    def dequantized_weight(self, layer) -> torch.Tensor:
        """The float32 weight the layer holds (the kernel also rounds the activations)."""
        return vnni.unpack(layer.qweight, layer.scale_min, layer.out_features)


class GGUFQuantConfig(QuantizationConfig):
    """Per layer from the file's tensor types: W4A16 where every shard is Q4_0/Q4_1/Q4_K."""

    name = "gguf"
    loads_packed = True
    splits_over_ranks = True

    def __init__(self, types: dict[str, str], packed_modules: dict[str, tuple[str, str]],
                 tie_word_embeddings: bool):
        self.types = types  # HF tensor name -> GGML type name
        # merged module name -> {shard id: checkpoint module name}, e.g. qkv_proj -> {q: q_proj}
        self.shards: dict[str, dict[str, str]] = {}
        for frag, (merged, shard) in packed_modules.items():
            self.shards.setdefault(merged, {})[shard] = frag
        self.tied = tie_word_embeddings
        self.repacked: Counter[str] = Counter()
        self.dequantized: Counter[str] = Counter()
        self.expert_layers = 0  # MoE layers whose experts come dequantized
        self.repacked_expert_layers = 0  # ... and repacked into W4A16 experts
        self.int8_layers = False  # layers built for the VNNI kernels (int8 activations)

    def weights(self, checkpoint, dtype):
        return checkpoint.weights(dtype, packed=True)

    def _int8_activations(self) -> bool:
        """Whether the layers built now take the VNNI kernels: a CPU model (the runner builds
        under its device; a GPU keeps its Triton kernels) on a CPU where they run. Remembered
        for the summary line."""
        here = torch.get_default_device().type == "cpu" and int8_activations_by_default()
        self.int8_layers = self.int8_layers or here
        return here

    def checkpoint_names(self, layer, prefix: str) -> list[str]:
        if prefix == "lm_head" and self.tied:
            return ["model.embed_tokens.weight"]
        offsets = getattr(layer, "shard_offsets", None)
        if not offsets:
            return [f"{prefix}.weight"]
        parent, merged = prefix.rsplit(".", 1)
        return [f"{parent}.{self.shards[merged][shard]}.weight" for shard in offsets]

    def get_quant_method(self, layer, prefix: str) -> QuantMethod:
        types = [self.types.get(name, "F32") for name in self.checkpoint_names(layer, prefix)]
        if all(t in INT4_TYPES for t in types):
            self.repacked.update(types)
            return W4A16Method(GROUP, int8_activations=self._int8_activations())
        if all(t == "Q8_0" for t in types):
            if self._int8_activations() and layer.in_features % GROUP == 0:
                self.repacked.update(types)
                return Q8VnniMethod()
            if getattr(layer, "params_dtype", None) == KERNEL_DTYPE:
                self.repacked.update(types)
                return Q8AsInt4PairMethod(GROUP)
        self.dequantized.update(t for t in types if t not in FLOAT_TYPES)
        return UnquantizedMethod()

    def get_moe_method(self, layer, prefix: str):
        """Stacked experts of a 4-bit type (both stacks): W4A16 experts repacked exactly from
        the blocks, each rank its own (whole experts, or its slice of the width where the down
        projection's columns split on block boundaries; else it slices the dequantized stacks);
        others come dequantized (loader/gguf_tensors.py) in the model dtype."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        from soarllm.quant.moe import W4A16FusedMoEMethod

        types = [self.types.get(f"{prefix}.{stack}", "F32") for stack in ("gate_up_proj", "down_proj")]
        whole = layer.tp.world_size == 1 or layer.expert_parallel
        aligned = all(t in INT4_TYPES for t in types) and (
            whole or layer.local_intermediate % GGML_QUANT_SIZES[GGMLQuantizationType[types[1]]][0]
            == 0)
        if aligned:
            self.repacked_expert_layers += 1
            return W4A16FusedMoEMethod(GROUP)
        self.expert_layers += 1
        return None

    def summary(self) -> str:
        def fmt(counter: Counter) -> str:
            return ", ".join(f"{n} {t}" for t, n in sorted(counter.items())) or "none"

        line = f"GGUF served quantized: repacked exactly (group 32): {fmt(self.repacked)}"
        if self.dequantized:
            line += (f"; dequantized to the model dtype (a type with no exact kernel, or in a layer "
                     f"with one): "
                     f"{fmt(self.dequantized)}")
        if self.repacked and self.int8_layers:
            line += (f" with int8 activations per 32 inputs ({vnni.isa()}; "
                     "SOARLLM_W4A16_CPU=torch: bfloat16)")
        embedding = self.types.get("model.embed_tokens.weight", "F32")
        line += f"; token embedding dequantized ({embedding})"
        if self.repacked_expert_layers:
            line += (f"; the experts of {self.repacked_expert_layers} MoE layers repacked into "
                     "W4A16 (group 32)")
        if self.expert_layers:
            line += f"; the experts of {self.expert_layers} MoE layers dequantized to the model dtype"
        return line
