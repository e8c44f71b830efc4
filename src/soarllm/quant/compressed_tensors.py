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

Served, not written here: llm-compressor's W8A8 (int8) scheme, the weights of w8a16 plus
``input_activations`` int8, symmetric, dynamic, one scale per token, stored "int-quantized"
(int8 ``weight`` + ``weight_scale``). Those layers run on the W8A8 method (quant/w8a8.py).
Static (calibrated) activation scales, asymmetric activations and per-tensor dynamic scales are
refused: the first need stored input scales the method does not load, the second a zero-point
correction the int8 GEMM lacks, the last makes a request's output depend on the rest of its batch.

The file's integers are signed, w = (q - zp) * scale. Loading regroups each layer's tensors into
one CompressedLinearWeight that the W8A16 / W4A16 methods take exactly (no re-rounding):
int8 rows as they are, int4 as the kernel's w = (q' - 8) s + z with q' = q + 8 and z = -zp s.

A ``sparsity_config`` of format ``sparse-24-bitmask`` (2:4, written by ``soar quantize
--sparsity 2:4``; quant/sparsity.py) stores the kept integers and a bitmask: those layers are
served compressed (quant/sparse24.py), or decompressed at load onto the dense methods with
``densify``. A ``dense`` sparsity_config is metadata only. Other schemes (other activation
quantization, FP8/NVFP4, act-order g_idx, unstructured or legacy sparse layouts) are refused with
an error naming what is supported.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.quant import sparsity
from soarllm.quant.base import QuantizationConfig, QuantMethod, UnquantizedMethod, as_float
from soarllm.quant.sparse24 import Sparse24Method
from soarllm.quant.w4a16 import GROUP_SIZES, W4A16Method
from soarllm.quant.w8a8 import W8A8Method
from soarllm.quant.w8a16 import W8A16Method

QUANT_METHOD = "compressed-tensors"
SCHEMES = ("w8a16", "w4a16", "w8a8")  # what `soar quantize` writes
_READ_FORMATS = ("naive-quantized", "int-quantized", "pack-quantized")
_PARAM_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                   "weight_g_idx", *sparsity.SPARSE_SUFFIXES)
_LEGACY_SPARSE_SUFFIXES = ("compressed", "shape")


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
    def sparse(self) -> bool:
        """2:4 in the sparse-24-bitmask layout: weight_packed holds the kept half of the inputs."""
        return "bitmask" in self.tensors

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
        if self.fmt != "pack-quantized":
            return t["weight"], scale, t.get("weight_zero_point")
        zp = self._zero_points()
        if self.sparse:
            return self._densified(zp), scale, zp
        rows, cols = self.shape
        q = unpack_from_int32(t["weight_packed"], self.args.num_bits, torch.Size((rows, cols)))
        return q, scale, zp

    def _kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept signed integers [out, in / 2], bool keep mask [out, in], checked 2:4)."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        rows, cols = self.shape
        mask = sparsity.unpack_mask(self.tensors["bitmask"], (rows, cols), self.name)
        packed = self.tensors["weight_packed"]
        words = math.ceil(cols // 2 * self.args.num_bits / 32)
        if tuple(packed.shape) != (rows, words):
            raise UnsupportedModelError(
                f"{self.name}: weight_packed {tuple(packed.shape)} does not hold the kept half "
                f"of a 2:4 [{rows}, {cols}] weight (int32 [{rows}, {words}] expected)")
        q = unpack_from_int32(packed, self.args.num_bits, torch.Size((rows, cols // 2)))
        return q, mask

    def _densified(self, zp: torch.Tensor | None) -> torch.Tensor:
        q, mask = self._kept()
        return _densified(q, mask, zp)

    def to_sparse24(self):
        """(kept int8 [out, in / 2], bitmask uint8 as stored, scale f32 [out, groups],
        zero point int8 [out, groups] or None): the compressed layout, for Sparse24Method."""
        q, _ = self._kept()
        return q, self.tensors["bitmask"], self.tensors["weight_scale"].float(), self._zero_points()

    def _zero_points(self) -> torch.Tensor | None:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        zp = self.tensors.get("weight_zero_point")
        if zp is None:
            return None
        rows = self.shape[0]
        groups = self.tensors["weight_scale"].shape[-1]
        return unpack_from_int32(zp, self.args.num_bits, torch.Size((rows, groups)), packed_dim=0)

    def dequantize(self) -> torch.Tensor:
        """float32 weight, by the library's own decompressor (the oracle of the repacks)."""
        from compressed_tensors.compressors import BaseCompressor

        compressor = BaseCompressor.get_value_from_registry(self.fmt)
        state = {k: v for k, v in self.tensors.items() if k not in ("weight_g_idx", "bitmask")}
        state["weight_scale"] = state["weight_scale"].float()
        if self.sparse:  # the library packs the dense integers; its decompressor does the rest
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

            state["weight_packed"] = pack_to_int32(self._densified(self._zero_points()),
                                                   self.args.num_bits)
        return compressor.decompress(state, self._scheme())["weight"].float()

    def _ints(self) -> _IntSlice:
        """The whole layer's stored integers."""
        q, scale, zp = self._int_values()
        return _IntSlice(self.name, q, scale.reshape(q.shape[0], -1), zp, self.args)

    def to_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 [out, in], f32 scale [out]) with w = q * scale: a symmetric per-channel layer."""
        return self._ints().to_int8()

    def to_int4(self, group_size: int):
        """(q uint8 in [0, 16), scale f32 [out, in/g], zero f32) with w = (q - 8) s + z."""
        return self._ints().to_int4(group_size)

    def narrow(self, dim: int, start: int, size: int) -> _IntSlice | _Sparse24Slice | None:
        """A tensor-parallel rank's rows, or columns on whole groups, as stored integers with
        their own scales (an int8 row keeps its scale); a 2:4 layer's as its kept integers and
        bitmask (columns on whole bytes of the mask). None for a cut through a group or a mask
        byte (the caller takes the dequantized slice)."""
        if self.sparse:
            return self._sparse_narrow(dim, start, size)
        w = self._ints()
        if dim == 0:
            rows = slice(start, start + size)
            return _IntSlice(w.name, w.q[rows], w.scale[rows],
                             None if w.zp is None else w.zp[rows], w.args)
        groups = w.scale.shape[-1]
        per = w.q.shape[1] // groups
        cols = w.q[:, start:start + size]
        if groups == 1:  # one scale per row: every rank keeps the whole row's scale
            return _IntSlice(w.name, cols, w.scale, w.zp, w.args)
        if start % per or size % per:
            return None
        g = slice(start // per, (start + size) // per)
        return _IntSlice(w.name, cols, w.scale[:, g], None if w.zp is None else w.zp[:, g],
                         w.args)


    def _sparse_narrow(self, dim: int, start: int, size: int) -> _Sparse24Slice | None:
        q, bitmask, scale, zp = self.to_sparse24()
        rows, cols = self.shape
        scale = scale.reshape(rows, -1)
        if dim == 0:
            part = slice(start, start + size)
            return _Sparse24Slice(self.name, q[part], bitmask[part], scale[part],
                                  None if zp is None else zp[part], (size, cols), self.args)
        groups = scale.shape[1]
        per = cols // groups
        # every group of 4 inputs keeps 2, so inputs [start, start + size) keep values
        # [start / 2, (start + size) / 2); the mask packs 8 inputs a byte
        if start % 8 or (size % 8 and start + size != cols) or (groups > 1 and (start % per
                                                                                  or size % per)):
            return None
        g = slice(start // per, (start + size) // per) if groups > 1 else slice(None)
        return _Sparse24Slice(self.name, q[:, start // 2:(start + size) // 2],
                              bitmask[:, start // 8:-(-(start + size) // 8)], scale[:, g],
                              None if zp is None else zp[:, g], (rows, size), self.args)


def _densified(q: torch.Tensor, mask: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    """Dense signed integers [out, in] of a 2:4 layer's kept integers q [out, in / 2] and keep
    mask: the kept values, each pruned one its group's zero point (so it dequantizes to 0)."""
    rows, cols = mask.shape
    if zp is None:
        dense = torch.zeros(rows, cols, dtype=torch.int8)
    else:
        dense = zp.repeat_interleave(cols // zp.shape[-1], dim=-1).to(torch.int8)
    dense[mask] = q.reshape(-1)
    return dense


@dataclass
class _Sparse24Slice:
    """A tensor-parallel rank's part of a 2:4 layer as stored: kept integers [rows, cols / 2],
    bitmask bytes [rows, cols / 8], scales and zero points of its groups."""

    name: str
    q: torch.Tensor
    bitmask: torch.Tensor
    scale: torch.Tensor
    zp: torch.Tensor | None
    shape: tuple[int, int]

    args: object

    def to_sparse24(self):
        return self.q, self.bitmask, self.scale, self.zp

    def _ints(self) -> _IntSlice:
        """The dense integers (``quantization="densify"``: the dense methods load them)."""
        mask = sparsity.unpack_mask(self.bitmask, self.shape, self.name)
        return _IntSlice(self.name, _densified(self.q, mask, self.zp), self.scale, self.zp,
                         self.args)

    def dequantize(self) -> torch.Tensor:
        return self._ints().dequantize()

    def to_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._ints().to_int8()

    def to_int4(self, group_size: int):
        return self._ints().to_int4(group_size)


@dataclass
class _IntSlice:
    """Stored integers of a layer or of a rank's part of it (``CompressedLinearWeight.narrow``):
    signed integers, float32 scales per row or per group, integer zero points or None."""

    name: str
    q: torch.Tensor
    scale: torch.Tensor
    zp: torch.Tensor | None
    args: object

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        per = self.q.shape[1] // self.scale.shape[1]
        zp = 0 if self.zp is None else self.zp.float().repeat_interleave(per, dim=1)
        return (self.q.float() - zp) * self.scale.repeat_interleave(per, dim=1)

    def to_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q.to(torch.int8), self.scale.reshape(-1)

    def to_int4(self, group_size: int):
        if self.args.num_bits != 4 or self.args.group_size != group_size:
            raise ValueError(f"{self.name}: stored as {self.args.num_bits}-bit group "
                             f"{self.args.group_size}, not int4 group {group_size}")
        zero = (torch.zeros_like(self.scale) if self.zp is None
                else -self.zp.float() * self.scale)
        return (self.q.to(torch.int16) + 8).to(torch.uint8), self.scale, zero


class _StoredInt8Rows:
    """Mixin for the int8 per-channel methods: rows and scales come from the file as they are."""

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


class CompressedW8A16Method(_StoredInt8Rows, W8A16Method):
    """W8A16 whose int8 rows and scales come from the file as they are."""


class CompressedW8A8Method(_StoredInt8Rows, W8A8Method):
    """W8A8 whose int8 rows and scales come from the file as they are."""


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


def _supported_input_args(inputs, weights) -> str | None:
    """Why a scheme's input activation args cannot be served here (W8A8 int8), or None."""
    if weights.num_bits != 8 or weights.strategy != "channel":
        return (f"{weights.num_bits}-bit {weights.strategy}-wise weights with quantized "
                "activations (only int8 per-channel weights pair with int8 activations)")
    if inputs.type != "int" or inputs.num_bits != 8:
        return f"{inputs.num_bits}-bit {inputs.type} activations"
    if inputs.dynamic is False:
        return "static (calibrated) activation scales; quantize with dynamic=True"
    if inputs.dynamic is not True:
        return f"dynamic={inputs.dynamic!s} activation scales; quantize with dynamic=True"
    if not inputs.symmetric:
        return "asymmetric activations"
    if inputs.strategy != "token":
        return (f"{inputs.strategy}-wise dynamic activation scales (one per batch couples the "
                "requests in it); quantize with strategy='token'")
    return None


class CompressedTensorsConfig(QuantizationConfig):
    """Serves a compressed-tensors checkpoint on the W8A16 / W4A16 / W8A8 methods (or, with
    ``dequantize``, every layer unquantized from the library's decompression)."""

    loads_packed = True

    splits_over_ranks = True  # each rank loads its stored integers (CompressedLinearWeight.narrow)

    def __init__(self, raw: dict, packed_modules: dict[str, tuple[str, str]],
                 dequantize: bool = False, where: str = "the checkpoint", densify: bool = False):
        _library()
        from compressed_tensors.quantization import QuantizationConfig as CTConfig

        try:
            self.ct = CTConfig.model_validate(raw)
        except Exception as e:  # pydantic's ValidationError
            raise ConfigError(f"{where}: its compressed-tensors quantization_config is invalid "
                              f"({e}); fix config.json") from None
        self.dequantize_all = dequantize
        self.densify = densify
        self.where = where
        fmt = self.ct.format
        problems = []
        if fmt not in _READ_FORMATS:
            problems.append(f"format {fmt!r}")
        self.sparse = _sparse_config(raw.get("sparsity_config"), fmt, problems)
        if densify and self.sparse is None:
            raise ConfigError(f"quantization='densify' applies to a compressed-tensors 2:4 "
                              f"checkpoint (soar quantize --sparsity 2:4); {where} has no 2:4 "
                              "layers. Leave quantization unset")
        if self.ct.kv_cache_scheme is not None:
            problems.append("a kv_cache_scheme")
        for name, scheme in self.ct.config_groups.items():
            if scheme.output_activations is not None:
                problems.append(f"group {name}: output activation quantization")
            elif scheme.weights is None:
                problems.append(f"group {name}: no weight quantization")
            elif (why := _supported_args(scheme.weights)) is not None:
                problems.append(f"group {name}: {why}")
            elif scheme.input_activations is not None and (
                    why := _supported_input_args(scheme.input_activations, scheme.weights)):
                problems.append(f"group {name}: {why}")
        if problems:
            raise UnsupportedModelError(
                f"{where} is a compressed-tensors checkpoint soarllm cannot serve: "
                f"{'; '.join(problems)}. Supported: weight-only int8 per channel (symmetric) and "
                f"int4 group {'/'.join(map(str, GROUP_SIZES))} (W8A16, W4A16), and int8 per "
                f"channel with int8 symmetric dynamic per-token activations (W8A8), in the "
                f"naive-, int- or pack-quantized formats; weight-only layers optionally 2:4 sparse "
                f"in the sparse-24-bitmask layout over pack-quantized, e.g. written by `soar quantize`"
            )
        self.fmt = fmt
        self.shards: dict[str, dict[str, str]] = {}
        for frag, (merged, shard) in packed_modules.items():
            self.shards.setdefault(merged, {})[shard] = frag
        scheme_names = sorted({"W8A8" if s.input_activations else f"{s.weights.num_bits}-bit"
                               for s in self.ct.config_groups.values()})
        if self.sparse is not None:
            scheme_names.append("2:4")
        self.name = f"compressed-tensors ({', '.join(scheme_names)})"
        self.counts: dict[str, int] = {}

    # which scheme a checkpoint module follows ---------------------------------------------------

    def _scheme_for(self, module: str):
        """The config group (QuantizationScheme) whose targets match `module` and that the
        ignore list leaves in, or None for an unquantized module."""
        from compressed_tensors.utils.match import match_name

        if any(match_name(module, ig) for ig in self.ct.ignore or ()):
            return None
        for scheme in self.ct.config_groups.values():
            for target in scheme.targets:
                if target == "Linear" or match_name(module, target):
                    return scheme
        return None

    def _args_for(self, module: str):
        """The weight args `module` is stored with, or None for an unquantized module."""
        scheme = self._scheme_for(module)
        return scheme.weights if scheme is not None else None

    def _is_sparse(self, module: str) -> bool:
        """Whether `module` (a quantized one) is stored 2:4 in the sparse-24-bitmask layout."""
        from compressed_tensors.utils.match import match_name

        sc = self.sparse
        if sc is None or any(match_name(module, ig) for ig in sc.ignore or ()):
            return False
        return sc.targets is None or any(t == "Linear" or match_name(module, t)
                                         for t in sc.targets)

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
        schemes = [self._scheme_for(m) for m in modules]
        found = [(s.weights, s.input_activations) if s is not None else None for s in schemes]
        if prefix == "lm_head" or self.dequantize_all or all(a is None for a in found):
            kind = "dequantized" if any(a is not None for a in found) else "unquantized"
            self.counts[kind] = self.counts.get(kind, 0) + 1
            return UnquantizedMethod()
        if any(a is None for a in found) or any(a != found[0] for a in found):
            raise UnsupportedModelError(
                f"{self.where}: the parts of {prefix} ({', '.join(modules)}) are quantized "
                "differently; soarllm serves merged layers with one scheme"
            )
        args, inputs = found[0]
        sparse = {self._is_sparse(m) for m in modules}
        if len(sparse) > 1:
            raise UnsupportedModelError(
                f"{self.where}: the parts of {prefix} ({', '.join(modules)}) are not all 2:4 "
                "sparse; soarllm serves merged layers with one scheme")
        if sparse == {True} and inputs is not None:
            raise UnsupportedModelError(
                f"{self.where}: {prefix} is 2:4 sparse with quantized activations (W8A8); "
                "soarllm serves 2:4 sparsity on weight-only schemes (W8A16, W4A16)")
        if sparse == {True} and not self.densify:
            method = Sparse24Method(args.num_bits, args.group_size, args.symmetric)
        elif inputs is not None:
            method = CompressedW8A8Method()
        elif args.num_bits == 8:
            method = CompressedW8A16Method()
        else:
            method = W4A16Method(args.group_size)
        label = method.describe()
        self.counts[label] = self.counts.get(label, 0) + 1
        return method

    # the tensor stream ----------------------------------------------------------------------------

    def weights(self, checkpoint, dtype) -> Iterator[tuple[str, object]]:
        """The checkpoint's tensors with each quantized layer's parts gathered into one
        ``<module>.weight`` CompressedLinearWeight; float tensors pass through in `dtype`."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in checkpoint.weights(torch.float32):
            module, suffix = name.rsplit(".", 1) if "." in name else ("", name)
            if suffix in _LEGACY_SPARSE_SUFFIXES and self.sparse is not None:
                raise UnsupportedModelError(
                    f"{self.where}: {name} is the legacy sparse-24-bitmask layout over an "
                    "unquantized or int-quantized weight (compressed / bitmask / shape); soarllm "
                    "serves 2:4 stacked on pack-quantized integers (soar quantize --sparsity 2:4)")
            stored = suffix in _PARAM_SUFFIXES or (suffix == "weight"
                                                   and not tensor.is_floating_point())
            args = self._args_for(module) if stored else None
            if args is None:
                if suffix in ("weight_packed", "weight_scale", "weight_zero_point", "bitmask"):
                    raise UnsupportedModelError(
                        f"{self.where}: tensor {name} belongs to a module the "
                        "quantization_config does not quantize; the config and the weights "
                        "do not match"
                    )
                yield name, (tensor.to(dtype) if tensor.is_floating_point() else tensor)
                continue
            parts = pending.setdefault(module, {})
            parts[suffix] = tensor
            if self._complete(module, parts, args):
                del pending[module]
                yield f"{module}.weight", self._linear(module, parts, args, dtype)
        if pending:
            module, parts = next(iter(pending.items()))
            raise UnsupportedModelError(
                f"{self.where} is incomplete or does not match its quantization_config: "
                f"{len(pending)} quantized module(s) lack tensors, e.g. {module} has only "
                f"{sorted(parts)}; re-download or re-write the checkpoint"
            )

    def _complete(self, module: str, parts: dict, args) -> bool:
        need = {"weight_packed", "weight_shape"} if self.fmt == "pack-quantized" else {"weight"}
        need.add("weight_scale")
        if self._is_sparse(module):
            need.add("bitmask")
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
        if "bitmask" in parts and not self._is_sparse(module):
            raise UnsupportedModelError(
                f"{self.where}: {module} has a bitmask but the sparsity_config does not make it "
                "2:4 sparse; the config and the weights do not match")
        linear = CompressedLinearWeight(module, parts, args, self.fmt)
        if linear.sparse:
            linear._kept()  # the stored mask is 2:4 and the kept values fit it, or a clear error
        if self.dequantize_all:
            return as_float(linear).to(dtype)
        return linear

    def summary(self) -> str:
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        fmt = self.fmt if self.sparse is None else f"{self.fmt} + sparse-24-bitmask"
        densified = ", 2:4 layers densified at load" if self.sparse is not None and self.densify else ""
        return f"compressed-tensors checkpoint ({fmt}): {parts}{densified}"


def _sparse_config(raw: dict | None, fmt: str, problems: list[str]):
    """The library's SparsityCompressionConfig when the layers are stored 2:4 compressed; None
    for no sparsity or a ``dense`` one (metadata: the weights are stored whole)."""
    if not raw:
        return None
    from compressed_tensors.config import SparsityCompressionConfig

    kind = raw.get("format")
    try:
        sc = SparsityCompressionConfig.load_from_registry(kind, **raw)
    except Exception:  # unknown format name (registry KeyError / ValueError) or bad fields
        problems.append(f"sparsity format {kind!r}")
        return None
    if sc.format == "dense":
        return None
    if sc.format != "sparse-24-bitmask":
        problems.append(f"sparsity format {sc.format!r}")
    elif (sc.sparsity_structure or "").lower() != sparsity.PATTERN:
        problems.append(f"sparse-24-bitmask with structure {sc.sparsity_structure!r}")
    elif fmt != "pack-quantized":
        problems.append(f"sparse-24-bitmask over {fmt!r} weights (the legacy layout)")
    else:
        return sc
    return None
