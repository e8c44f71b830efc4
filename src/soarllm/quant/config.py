"""The `quantization` engine argument -> the QuantizationConfig every model constructor gets.

    None          take it from the checkpoint: a GGUF file is served quantized (quant/gguf.py);
                  an unquantized checkpoint stays unquantized
    "none"        dequantize everything to the model dtype (a GGUF file's float path)
    "gguf"        the GGUF file's own blocks (an error for other checkpoints)
    "w8a16"       quantize float weights at load: int8, one scale per output channel (RTN)
    "w4a16"       quantize float weights at load: int4, asymmetric, group 32 (RTN);
                  "w4a16-g64" / "w4a16-g128" pick the group size
    "w8a8"        quantize float weights at load as for w8a16, and the activations per token at
                  run time (int8 x int8 GEMM, quant/w8a8.py): plain W8A8, no smoothing
    "densify"     a compressed-tensors 2:4 checkpoint's layers decompressed at load onto the
                  dense W8A16 / W4A16 kernels (faster; unset keeps them compressed: less memory)

A checkpoint whose config.json has a compressed-tensors quantization_config (`soar quantize`,
llm-compressor) is served as stored with quantization unset (quant/compressed_tensors.py),
dequantized with "none", or with its 2:4 layers densified with "densify"; other settings are
refused for it.

Quantizing at load leaves `lm_head` in the model dtype, as quantization tools do by default
(the logits are the most sensitive product); a GGUF file's head follows the file. In a
Mixture-of-Experts model "w8a16" and "w4a16" quantize the experts too (quant/moe.py; the routers
stay in the model dtype); "w8a8" is refused there (no int8 x int8 grouped matmul yet).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.quant.base import QuantizationConfig, QuantMethod, UnquantizedMethod
from soarllm.quant.moe import W4A16FusedMoEMethod, W8A16FusedMoEMethod
from soarllm.quant.w4a16 import GROUP_SIZES, W4A16Method
from soarllm.quant.w8a8 import W8A8Method
from soarllm.quant.w8a16 import W8A16Method

if TYPE_CHECKING:
    from soarllm.model.loader.checkpoint import Checkpoint

QUANTIZATION_CHOICES = ("none", "gguf", "w8a16", "w4a16", "w4a16-g64", "w4a16-g128", "w8a8",
                        "densify")
_W4A16 = re.compile(r"w4a16(?:-g(\d+))?")


class RTNConfig(QuantizationConfig):
    """Round-to-nearest at load time, every linear layer but the LM head."""

    splits_over_ranks = True

    def __init__(self, scheme: str, group_size: int = 32):
        self.scheme, self.group_size = scheme, group_size
        self.name = scheme if scheme in ("w8a16", "w8a8") else f"w4a16-g{group_size}"
        self.quantized = 0
        self.quantized_experts = 0

    def _method(self) -> QuantMethod:
        if self.scheme == "w8a16":
            return W8A16Method()
        if self.scheme == "w8a8":
            return W8A8Method()
        return W4A16Method(self.group_size)

    def get_quant_method(self, layer, prefix: str) -> QuantMethod:
        if prefix == "lm_head":
            return UnquantizedMethod()
        self.quantized += 1
        return self._method()

    def get_moe_method(self, layer, prefix: str):
        if self.scheme == "w8a8":
            raise ConfigError(
                f"{prefix or 'the model'}: quantization='w8a8' has no kernel for the experts of a "
                "Mixture-of-Experts model yet; use quantization='w8a16' (or 'w4a16'), which "
                "quantizes the experts too, or leave quantization unset")
        self.quantized_experts += 1
        return W8A16FusedMoEMethod() if self.scheme == "w8a16" else W4A16FusedMoEMethod(self.group_size)

    def weights(self, checkpoint, dtype):
        # quantize from full precision, not from weights already rounded to the model dtype
        return checkpoint.weights(torch.float32)

    def summary(self) -> str:
        method = self._method().describe()
        line = f"quantized at load (round to nearest): {self.quantized} linear layers {method}"
        if self.quantized_experts:
            line += f", the experts of {self.quantized_experts} MoE layers too (routers unquantized)"
        return line + "; lm_head unquantized"


def parse_quantization(quantization: str | None) -> str | None:
    if quantization is None:
        return None
    value = str(quantization).strip().lower()
    m = _W4A16.fullmatch(value)
    if m and m.group(1) and int(m.group(1)) not in GROUP_SIZES:
        raise ConfigError(
            f"W4A16 group size {m.group(1)} is not supported; use one of {GROUP_SIZES} "
            "(e.g. quantization='w4a16-g128')"
        )
    if value not in ("none", "gguf", "w8a16", "w8a8", "densify") and not m:
        raise ConfigError(
            f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATION_CHOICES)} "
            "(or leave it unset to follow the checkpoint)"
        )
    return value


def get_quant_config(quantization: str | None, checkpoint: Checkpoint,
                     packed_modules: dict[str, tuple[str, str]]) -> QuantizationConfig | None:
    """The config the model is built with; None means every layer unquantized."""
    value = parse_quantization(quantization)
    is_gguf = checkpoint.format == "gguf"
    compressed = _compressed_tensors_config(value, checkpoint, packed_modules)
    if compressed is not None:
        return compressed
    if value == "densify":
        raise ConfigError(f"quantization='densify' applies to a compressed-tensors 2:4 checkpoint "
                          f"(soar quantize --sparsity 2:4); {checkpoint.path} is not one. "
                          "Leave quantization unset")
    if value is None:
        _refuse_unknown_checkpoint_quantization(checkpoint)
        value = "gguf" if is_gguf else "none"
    if value == "none":
        return None
    if value == "gguf":
        if not is_gguf:
            raise ConfigError(
                f"quantization='gguf' needs a .gguf checkpoint; {checkpoint.path} is "
                f"{checkpoint.format}. Leave quantization unset, or use w8a16 / w4a16 / w8a8"
            )
        from soarllm.quant.gguf import GGUFQuantConfig

        return GGUFQuantConfig(
            checkpoint.packed_types(), packed_modules,
            bool(getattr(checkpoint.config, "tie_word_embeddings", False)),
        )
    if value in ("w8a16", "w8a8"):
        return RTNConfig(value)
    group = _W4A16.fullmatch(value).group(1)
    return RTNConfig("w4a16", int(group) if group else 32)


def _compressed_tensors_config(value: str | None, checkpoint: Checkpoint,
                               packed_modules) -> QuantizationConfig | None:
    """A compressed-tensors checkpoint (soar quantize, llm-compressor): served quantized, or
    dequantized with quantization='none'."""
    qc = getattr(checkpoint.config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return None
    if value not in (None, "none", "densify"):
        raise ConfigError(
            f"{checkpoint.path} is already quantized (compressed-tensors); leave quantization "
            "unset to serve it as stored, use quantization='none' to dequantize it, or "
            "'densify' to run a 2:4 checkpoint on the dense kernels"
        )
    from soarllm.quant.compressed_tensors import CompressedTensorsConfig

    return CompressedTensorsConfig(qc, packed_modules, dequantize=value == "none",
                                   where=str(checkpoint.path), densify=value == "densify")


def _refuse_unknown_checkpoint_quantization(checkpoint: Checkpoint) -> None:
    qc = getattr(checkpoint.config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise UnsupportedModelError(
            f"{checkpoint.path} is quantized with {method!r}, which soarllm cannot load yet; "
            "use an unquantized or GGUF checkpoint"
        )
