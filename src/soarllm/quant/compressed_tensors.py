"""The compressed-tensors checkpoint format (llm-compressor's, read by transformers and vLLM).

A checkpoint's config.json carries a ``quantization_config`` with ``quant_method:
"compressed-tensors"``: config groups of a QuantizationScheme (targets + weight
QuantizationArgs), a storage ``format`` and an ``ignore`` list. The schemes soarllm writes and
serves, through the `compressed-tensors` package's own config classes and packers:

    w8a16   int8, symmetric, one scale per output channel
            tensors: weight_packed int32 [out, in/4], weight_scale [out, 1], weight_shape [2]
    w4a16   int4, group 32/64/128, asymmetric
            tensors: weight_packed int32 [out, in/8], weight_scale [out, in/g],
            weight_zero_point int32 [out/8, in/g] (packed along rows), weight_shape [2]

both in the "pack-quantized" format, the one the library infers for integer weight-only schemes
(and the one vLLM's WNA16 kernels read); "naive-quantized" / "int-quantized" files (int8
``weight`` as stored) load too. `soar quantize` also writes

    w8a8    w8a16's weights + input activations int8, symmetric, dynamic, one scale per token
            (the config group's ``input_activations``); tensors: weight int8 [out, in],
            weight_scale [out, 1], in the "int-quantized" format the library infers for it

The file's integers are signed, w = (q - zp) * scale. Loading regroups each layer's tensors into
one CompressedLinearWeight that the W8A16 / W4A16 methods take exactly (no re-rounding):
int8 rows as they are, int4 as the kernel's w = (q' - 8) s + z with q' = q + 8 and z = -zp s.
Other schemes (activation quantization, FP8/NVFP4, act-order g_idx, sparsity) are refused with
an error naming what is supported.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.quant.base import QuantizationConfig, QuantMethod, UnquantizedMethod, as_float
from soarllm.quant.w4a16 import GROUP_SIZES, W4A16Method
from soarllm.quant.w8a16 import W8A16Method

QUANT_METHOD = "compressed-tensors"
SCHEMES = ("w8a16", "w4a16", "w8a8")  # what `soar quantize` writes
_READ_FORMATS = ("naive-quantized", "int-quantized", "pack-quantized")
_PARAM_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                   "weight_g_idx")


def _library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the compressed-tensors format needs the `compressed-tensors` package: "
            "pip install 'soarllm[quantize]' (or pip install compressed-tensors)"
        ) from None


# -- the scheme: the library's config classes ---------------------------------------------------

def weight_args(scheme: str, group_size: int | None = None):
    """The library's QuantizationArgs of one of our schemes."""
    _library()
    from compressed_tensors.quantization import QuantizationArgs

    if scheme in ("w8a16", "w8a8"):
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    if scheme == "w4a16":
        if group_size not in GROUP_SIZES:
            raise ConfigError(f"W4A16 group size {group_size} is not supported; use one of {GROUP_SIZES}")
        return QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                                group_size=group_size)
    raise ConfigError(f"unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def activation_args(scheme: str):
    """The library's QuantizationArgs of a scheme's input activations (None: weight-only)."""
    _library()
    from compressed_tensors.quantization import QuantizationArgs

    if scheme == "w8a8":  # a scale per token, computed at run time: no calibrated input scale
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                                dynamic=True)
    return None


def quantization_config(scheme: str, group_size: int | None, ignore: list[str]) -> dict:
    """config.json's ``quantization_config`` for a checkpoint of `scheme` (the library's model)."""
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from compressed_tensors.quantization import QuantizationScheme

    args, inputs = weight_args(scheme, group_size), activation_args(scheme)
    config = CTConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args,
                                                     input_activations=inputs)},
        format=storage_format(args, inputs), quantization_status="compressed", ignore=ignore,
    )
    return config.model_dump(mode="json", exclude_none=True)


def storage_format(args, input_args=None) -> str:
    """The format the library infers for a linear layer under `args` (and `input_args`)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=input_args)
    return infer_module_format(torch.nn.Linear, scheme).value


def qparams(weight: torch.Tensor, args, scale_dtype: torch.dtype):
    """Round-to-nearest (scale, zero point) of a float weight [out, in] under `args`, by the
    library's calculate_qparams; scales rounded to `scale_dtype` (what the file stores)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.float()
    if args.strategy == "group":
        g = args.group_size
        w = w.reshape(w.shape[0], -1, g)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale, zp = calculate_qparams(lo, hi, args)
    scale = scale.to(scale_dtype)
    if args.strategy == "channel":
        scale, zp = scale.reshape(-1, 1), zp.reshape(-1, 1)
    return scale, zp


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, args) -> torch.Tensor:
    """Quantize then dequantize (float32), by the library's own rounding."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as fq

    return fq(weight.float(), scale.float(), zp, args)


def compress_linear(weight: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, args,
                    input_args=None) -> dict[str, torch.Tensor]:
    """One layer's tensors in the file layout, by the library's compressor for the format
    (a weight already on the grid of (scale, zp), e.g. GPTQ's, is stored exactly)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    compressor = BaseCompressor.get_value_from_registry(storage_format(args, input_args))
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=input_args)
    state = {"weight": weight.float(), "weight_scale": scale, "weight_zero_point": zp}
    out = compressor.compress(state, scheme)
    return {k: v.contiguous() for k, v in out.items()}


# -- loading ------------------------------------------------------------------------------------

@dataclass
class CompressedLinearWeight:
    """One linear layer's compressed-tensors tensors, handed to its QuantMethod as one object."""

    name: str
    tensors: dict[str, torch.Tensor]  # suffix (weight / weight_packed / weight_scale ...) -> tensor
    args: object  # the library's QuantizationArgs
    fmt: str

    @property
    def shape(self) -> tuple[int, int]:
        if "weight_shape" in self.tensors:
            return tuple(int(x) for x in self.tensors["weight_shape"].tolist())
        return tuple(self.tensors["weight"].shape)

    def _scheme(self):
        from compressed_tensors.quantization import QuantizationScheme

        return QuantizationScheme(targets=["Linear"], weights=self.args)

    def _int_values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(signed integer weight [out, in], float32 scale, integer zero point or None)."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        t = self.tensors
        scale = t["weight_scale"].float()
        zp = t.get("weight_zero_point")
        if self.fmt == "pack-quantized":
            rows, cols = self.shape
            q = unpack_from_int32(t["weight_packed"], self.args.num_bits, torch.Size((rows, cols)))
            if zp is not None:
                zp = unpack_from_int32(zp, self.args.num_bits,
                                       torch.Size((rows, scale.shape[-1])), packed_dim=0)
        else:
            q = t["weight"]
        return q, scale, zp

    def dequantize(self) -> torch.Tensor:
        """float32 weight, by the library's own decompressor (the oracle of the repacks)."""
        from compressed_tensors.compressors import BaseCompressor

        compressor = BaseCompressor.get_value_from_registry(self.fmt)
        state = {k: v for k, v in self.tensors.items() if k != "weight_g_idx"}
        state["weight_scale"] = state["weight_scale"].float()
        return compressor.decompress(state, self._scheme())["weight"].float()

    def to_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 [out, in], f32 scale [out]) with w = q * scale: a symmetric per-channel layer."""
        q, scale, _ = self._int_values()
        return q.to(torch.int8), scale.reshape(-1)

    def to_int4(self, group_size: int):
        """(q uint8 in [0, 16), scale f32 [out, in/g], zero f32) with w = (q - 8) s + z."""
        if self.args.num_bits != 4 or self.args.group_size != group_size:
            raise ValueError(f"{self.name}: stored as {self.args.num_bits}-bit group "
                             f"{self.args.group_size}, not int4 group {group_size}")
        q, scale, zp = self._int_values()
        zero = torch.zeros_like(scale) if zp is None else -zp.float() * scale
        return (q.to(torch.int16) + 8).to(torch.uint8), scale, zero


class CompressedW8A16Method(W8A16Method):
    """W8A16 whose int8 rows and scales come from the file as they are."""

    def load_weight(self, layer, param, loaded, shard_id=None) -> None:
        to_int8 = getattr(loaded, "to_int8", None)
        if to_int8 is None:
            return super().load_weight(layer, param, loaded, shard_id)
        from soarllm.quant.base import check_rows, shard_range

        off, size = shard_range(layer, shard_id, layer.out_features)
        check_rows("weight", shard_id, (size, layer.in_features), loaded.shape)
        q, scale = to_int8()
        layer.qweight.data[off : off + size] = q
        layer.scales.data[off : off + size] = scale


def _supported_args(args) -> str | None:
    """Why the library's weight QuantizationArgs cannot be served here, or None."""
    if args.type != "int":
        return f"{args.type} weights"
    if args.num_bits == 8 and args.symmetric and args.strategy == "channel":
        return None
    if args.num_bits == 4 and args.strategy == "group":
        if args.group_size not in GROUP_SIZES:
            return f"int4 group size {args.group_size}"
        if args.actorder == "group":
            return "act-order with a group index (actorder='group')"
        return None
    sym = "symmetric" if args.symmetric else "asymmetric"
    return f"{args.num_bits}-bit {sym} {args.strategy}-wise weights"


class CompressedTensorsConfig(QuantizationConfig):
    """Serves a compressed-tensors checkpoint on the W8A16 / W4A16 methods (or, with
    ``dequantize``, every layer unquantized from the library's decompression)."""

    loads_packed = True

    def __init__(self, raw: dict, packed_modules: dict[str, tuple[str, str]],
                 dequantize: bool = False, where: str = "the checkpoint"):
        _library()
        from compressed_tensors.quantization import QuantizationConfig as CTConfig

        try:
            self.ct = CTConfig.model_validate(raw)
        except Exception as e:  # pydantic's ValidationError
            raise ConfigError(f"{where}: its compressed-tensors quantization_config is invalid "
                              f"({e}); fix config.json") from None
        self.dequantize_all = dequantize
        self.where = where
        fmt = self.ct.format
        problems = []
        if fmt not in _READ_FORMATS:
            problems.append(f"format {fmt!r}")
        if raw.get("sparsity_config"):
            problems.append("a sparsity_config")
        if self.ct.kv_cache_scheme is not None:
            problems.append("a kv_cache_scheme")
        for name, scheme in self.ct.config_groups.items():
            if scheme.input_activations is not None or scheme.output_activations is not None:
                problems.append(f"group {name}: activation quantization")
            elif scheme.weights is None:
                problems.append(f"group {name}: no weight quantization")
            elif (why := _supported_args(scheme.weights)) is not None:
                problems.append(f"group {name}: {why}")
        if problems:
            raise UnsupportedModelError(
                f"{where} is a compressed-tensors checkpoint soarllm cannot serve: "
                f"{'; '.join(problems)}. Supported: weight-only int8 per channel (symmetric) and "
                f"int4 group {'/'.join(map(str, GROUP_SIZES))} (W8A16, W4A16) in the "
                f"naive-, int- or pack-quantized formats, e.g. written by `soar quantize`"
            )
        self.fmt = fmt
        self.shards: dict[str, dict[str, str]] = {}
        for frag, (merged, shard) in packed_modules.items():
            self.shards.setdefault(merged, {})[shard] = frag
        scheme_names = sorted({f"{s.weights.num_bits}-bit" for s in self.ct.config_groups.values()})
        self.name = f"compressed-tensors ({', '.join(scheme_names)})"
        self.counts: dict[str, int] = {}

    # which scheme a checkpoint module follows ---------------------------------------------------

    def _args_for(self, module: str):
        """The weight args of the config group whose targets match `module` (and that the ignore
        list leaves in), or None for an unquantized module."""
        from compressed_tensors.utils.match import match_name

        if any(match_name(module, ig) for ig in self.ct.ignore or ()):
            return None
        for scheme in self.ct.config_groups.values():
            for target in scheme.targets:
                if target == "Linear" or match_name(module, target):
                    return scheme.weights
        return None

    def _checkpoint_modules(self, layer, prefix: str) -> list[str]:
        offsets = getattr(layer, "shard_offsets", None)
        if not offsets or "." not in prefix:
            return [prefix]
        parent, merged = prefix.rsplit(".", 1)
        if merged not in self.shards:
            return [prefix]
        return [f"{parent}.{self.shards[merged][s]}" for s in offsets]

    def get_quant_method(self, layer, prefix: str) -> QuantMethod:
        modules = self._checkpoint_modules(layer, prefix)
        found = [self._args_for(m) for m in modules]
        if prefix == "lm_head" or self.dequantize_all or all(a is None for a in found):
            kind = "dequantized" if any(a is not None for a in found) else "unquantized"
            self.counts[kind] = self.counts.get(kind, 0) + 1
            return UnquantizedMethod()
        if any(a is None for a in found) or any(a != found[0] for a in found):
            raise UnsupportedModelError(
                f"{self.where}: the parts of {prefix} ({', '.join(modules)}) are quantized "
                "differently; soarllm serves merged layers with one scheme"
            )
        args = found[0]
        if args.num_bits == 8:
            self.counts["W8A16 (per channel)"] = self.counts.get("W8A16 (per channel)", 0) + 1
            return CompressedW8A16Method()
        label = f"W4A16 (group {args.group_size})"
        self.counts[label] = self.counts.get(label, 0) + 1
        return W4A16Method(args.group_size)

    # the tensor stream ----------------------------------------------------------------------------

    def weights(self, checkpoint, dtype) -> Iterator[tuple[str, object]]:
        """The checkpoint's tensors with each quantized layer's parts gathered into one
        ``<module>.weight`` CompressedLinearWeight; float tensors pass through in `dtype`."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in checkpoint.weights(torch.float32):
            module, suffix = name.rsplit(".", 1) if "." in name else ("", name)
            stored = suffix in _PARAM_SUFFIXES or (suffix == "weight"
                                                   and not tensor.is_floating_point())
            args = self._args_for(module) if stored else None
            if args is None:
                if suffix in ("weight_packed", "weight_scale", "weight_zero_point"):
                    raise UnsupportedModelError(
                        f"{self.where}: tensor {name} belongs to a module the "
                        "quantization_config does not quantize; the config and the weights "
                        "do not match"
                    )
                yield name, (tensor.to(dtype) if tensor.is_floating_point() else tensor)
                continue
            parts = pending.setdefault(module, {})
            parts[suffix] = tensor
            if self._complete(parts, args):
                del pending[module]
                yield f"{module}.weight", self._linear(module, parts, args, dtype)
        if pending:
            module, parts = next(iter(pending.items()))
            raise UnsupportedModelError(
                f"{self.where} is incomplete or does not match its quantization_config: "
                f"{len(pending)} quantized module(s) lack tensors, e.g. {module} has only "
                f"{sorted(parts)}; re-download or re-write the checkpoint"
            )

    def _complete(self, parts: dict, args) -> bool:
        need = {"weight_packed", "weight_shape"} if self.fmt == "pack-quantized" else {"weight"}
        need.add("weight_scale")
        if not args.symmetric:
            need.add("weight_zero_point")
        return need <= parts.keys()

    def _linear(self, module: str, parts: dict, args, dtype):
        if "weight_g_idx" in parts:
            raise UnsupportedModelError(
                f"{self.where}: {module} has a weight_g_idx (act-order with reordered groups); "
                "soarllm serves static act-order only: quantize with actorder='weight' or none"
            )
        if self.fmt != "pack-quantized" and parts["weight"].is_floating_point():
            raise UnsupportedModelError(
                f"{self.where}: {module}.weight is {parts['weight'].dtype}, not the int8 the "
                f"{self.fmt!r} format stores; the checkpoint was saved uncompressed"
            )
        linear = CompressedLinearWeight(module, parts, args, self.fmt)
        if self.dequantize_all:
            return as_float(linear).to(dtype)
        return linear

    def summary(self) -> str:
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        return f"compressed-tensors checkpoint ({self.fmt}): {parts}"
