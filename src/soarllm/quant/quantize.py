"""`soar quantize`: a model's float weights -> a compressed-tensors HF directory.

The float weights are the checkpoint's own (a GGUF file's dequantized, the "full precision" base
of the default model) in a transformers model built from the same config; every nn.Linear of the
decoder layers is quantized, the LM head and the embeddings are left in `dtype`. Methods per
scheme (`METHODS`): round to nearest; GPTQ over calibration text; AWQ (w4a16: per-channel scales
searched on calibration activations, then RTN); SmoothQuant (w8a8: activation outliers migrated
into the weights, then RTN). AWQ and SmoothQuant fold their scales into the norms (or linears)
before the layers, which are written changed. The directory (config.json with the quantization_config,
the tokenizer files, model.safetensors) is written under a temporary name beside `out` and
renamed into place at the end, so `out` is never half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.quant import sparsity
from soarllm.quant.compressed_tensors import (
    SCHEMES,
    activation_args,
    compress_linear,
    quantization_config,
    weight_args,
)
from soarllm.quant.w4a16 import GROUP_SIZES

logger = logging.getLogger(__name__)

METHODS = {  # scheme -> the methods that write it
    "w8a16": ("rtn", "gptq"),
    "w4a16": ("rtn", "gptq", "awq"),
    "w8a8": ("rtn", "smoothquant"),
}
ALL_METHODS = ("rtn", "gptq", "awq", "smoothquant")
CALIBRATED = ("gptq", "awq", "smoothquant")  # read calibration text
DEFAULT_SMOOTHING_STRENGTH = 0.5
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SKIP_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".pth")


@dataclass
class QuantizeOptions:
    scheme: str = "w4a16"
    method: str = "rtn"
    group_size: int | None = None  # w4a16: the largest of 128/64/32 dividing every layer when unset
    calib: str = "stdlib,prose"
    num_samples: int = 128
    seq_len: int = 256
    dtype: str = "bfloat16"  # of the scales and the tensors left unquantized
    act_order: bool = False
    damp: float = 0.01
    smoothing_strength: float | None = None  # SmoothQuant's alpha (DEFAULT_SMOOTHING_STRENGTH)
    progress: bool = True
    seed: int = 0
    sparsity: str | None = None  # "2:4": prune before quantizing (quant/sparsity.py)
    prune: str | None = None  # magnitude | wanda; unset: wanda with GPTQ, magnitude with RTN
    sparse_format: str = "sparse-24-bitmask"  # or "dense" (zeros stored, readable everywhere)

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown scheme {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if self.method not in ALL_METHODS:
            raise ConfigError(f"unknown method {self.method!r}; use one of {', '.join(ALL_METHODS)}")
        if self.method not in METHODS[self.scheme]:
            fits = [s for s, methods in METHODS.items() if self.method in methods]
            raise ConfigError(
                f"--method {self.method} does not apply to --scheme {self.scheme}; use "
                f"{' or '.join(METHODS[self.scheme])} with {self.scheme}, or --method "
                f"{self.method} with --scheme {' or '.join(fits)}"
            )
        if self.scheme != "w4a16" and self.group_size is not None:
            raise ConfigError(f"--group-size applies to w4a16 only ({self.scheme} has one scale "
                              "per output channel); leave it out")
        if self.scheme == "w4a16" and self.group_size is not None:
            if self.group_size not in GROUP_SIZES:
                raise ConfigError(f"group size {self.group_size} is not supported; use one of "
                                  f"{', '.join(map(str, GROUP_SIZES))}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if (self.method in CALIBRATED or self.prune == "wanda") and (self.num_samples < 1
                                                                      or self.seq_len < 2):
            what = self.method if self.method in CALIBRATED else "Wanda pruning"
            raise ConfigError(f"{what} calibrates: it needs --num-samples >= 1 and "
                              "--seq-len >= 2")
        if self.smoothing_strength is not None:
            if self.method != "smoothquant":
                raise ConfigError("--smoothing-strength applies to --method smoothquant only")
            if not 0 <= self.smoothing_strength <= 1:
                raise ConfigError(f"smoothing strength {self.smoothing_strength} must be between "
                                  "0 and 1 (0.5 balances activations and weights; higher moves "
                                  "more of the outliers into the weights)")
        if self.sparsity and (self.scheme == "w8a8" or self.method not in ("rtn", "gptq")):
            raise ConfigError("--sparsity 2:4 applies to the weight-only schemes (w8a16, w4a16) "
                              "with --method rtn or gptq; drop --sparsity or change the method")
        if self.act_order and self.method != "gptq":
            raise ConfigError("--act-order applies to --method gptq only")
        if not 0 < self.damp < 1:
            raise ConfigError(f"damping {self.damp} must be between 0 and 1 (e.g. 0.01)")
        sparsity.check_options(self.sparsity, self.prune, self.sparse_format)

    @property
    def wanda(self) -> bool:
        """2:4 selection by |W| * ||X||: needs the calibration pass (GPTQ runs it anyway)."""
        return self.sparsity is not None and (self.prune or ("wanda" if self.method == "gptq"
                                                              else "magnitude")) == "wanda"


@dataclass
class QuantizeReport:
    out: Path
    quantized: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0
    summary: str = ""  # what the method found, one line (AWQ: its error against RTN's)


def check_out(out: Path) -> None:
    if out.exists():
        raise ConfigError(f"--out {out} already exists; remove it or choose another directory")
    if not out.parent.is_dir():
        raise ConfigError(f"the parent of --out {out} does not exist; create {out.parent} first")


def quantize_model(model: str, out: str | Path, opts: QuantizeOptions) -> QuantizeReport:
    opts.check()
    out = Path(out).absolute()
    check_out(out)
    t0 = time.perf_counter()
    checkpoint = load_float_checkpoint(model)
    hf = float_model(checkpoint)
    compressed, summary = quantize_float_model(hf, checkpoint.tokenizer_dir, opts)
    report = write_directory(out, checkpoint, hf, compressed, opts)
    report.seconds = time.perf_counter() - t0
    report.summary = summary
    return report


def load_float_checkpoint(model: str):
    """The checkpoint of `model`, refused when it is already quantized or has no tokenizer."""
    from soarllm.model.loader import load_checkpoint

    checkpoint = load_checkpoint(model)
    qc = getattr(checkpoint.config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ConfigError(f"{checkpoint.path} is already quantized ({method}); give a float "
                          "checkpoint (or a GGUF file) to quantize")
    if checkpoint.tokenizer_dir is None:
        raise ConfigError(f"{checkpoint.path} has no tokenizer files; the written directory "
                          "would not load. Give a model directory with its tokenizer")
    return checkpoint


def quantize_float_model(hf: nn.Module, tokenizer_dir, opts: QuantizeOptions,
                         ) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    """Quantize the decoder linears of a float transformers model in place (weights left on
    their grid, smoothing folded in) -> (checkpoint module -> file tensors, a summary line).
    Sets opts.group_size when it was left to choose."""
    opts.check()
    linears = decoder_linears(hf)
    if opts.scheme == "w4a16" and opts.group_size is None:
        fits = [g for g in sorted(GROUP_SIZES, reverse=True)
                if all(m.in_features % g == 0 for m in linears.values())]
        opts.group_size = fits[0] if fits else max(GROUP_SIZES)  # none fits: the error below
    args = weight_args(opts.scheme, opts.group_size)
    if opts.scheme == "w4a16":
        bad = [(n, m.in_features) for n, m in linears.items() if m.in_features % opts.group_size]
        if bad:
            name, size = bad[0]
            fits = [g for g in GROUP_SIZES if size % g == 0]
            raise ConfigError(
                f"group size {opts.group_size} does not divide the {size} inputs of {name} "
                f"({len(bad)} layer(s) like it); use --group-size "
                f"{' or '.join(map(str, fits)) if fits else '(none fits: use --scheme w8a16)'}"
            )
    if opts.sparsity:
        sparsity.check_prunable(linears)
    fmt = _Format(args, activation_args(opts.scheme), DTYPES[opts.dtype])
    compressed: dict[str, dict[str, torch.Tensor]] = {}
    summary = ""
    if opts.method == "smoothquant":
        summary = _smoothquant(hf, tokenizer_dir, opts)
    if opts.method in ("rtn", "smoothquant") and not opts.wanda:
        _rtn(linears, fmt, compressed, opts)
    elif opts.method in ("rtn", "gptq"):  # RTN with a Wanda mask calibrates for the mask
        _gptq(hf, tokenizer_dir, fmt, compressed, opts)
    else:
        summary = _awq(hf, tokenizer_dir, fmt, compressed, opts)
    return compressed, summary


def analyze_model(model: str, opts: QuantizeOptions):
    """`soar quantize --analyze`: the activation outliers of each decoder linear input of
    `model` over the calibration text (analyze.InputOutliers rows, the largest ratio first)."""
    from soarllm.quant.activations import input_stats
    from soarllm.quant.analyze import outliers

    if opts.num_samples < 1 or opts.seq_len < 2:
        raise ConfigError("--analyze needs --num-samples >= 1 and --seq-len >= 2")
    checkpoint = load_float_checkpoint(model)
    hf = float_model(checkpoint)
    samples = calibration_samples(checkpoint.tokenizer_dir, opts.calib, opts.num_samples,
                                  opts.seq_len)
    stats = input_stats(hf, decoder_linears(hf), samples, opts.progress,
                        desc="activation statistics")
    return outliers(stats)


def float_model(checkpoint) -> nn.Module:
    """A transformers causal LM (float32) holding the checkpoint's weights."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_config(checkpoint.config).float()
    except ValueError as e:
        raise UnsupportedModelError(f"transformers cannot build {checkpoint.path}'s model ({e}); "
                                    "soar quantize needs a causal LM transformers knows") from None
    state = dict(checkpoint.weights(torch.float32))
    result = model.load_state_dict(state, strict=False)
    tied = bool(getattr(checkpoint.config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise UnsupportedModelError(
            f"{checkpoint.path}'s tensors do not match transformers' model of its config "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}); soar quantize "
            "supports dense decoder models (Llama, Qwen2, Mistral, Gemma)"
        )
    if tied:
        model.tie_weights()
    return model.eval()


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Checkpoint module name -> nn.Linear, for every linear layer inside the decoder layers."""
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and ".layers." in f".{n}" and n != "lm_head"}
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no linear layers under "
                                    "model.layers to quantize")
    return found


@dataclass
class _Format:
    """What a layer is written as: the library's weight (and input) args, the scale dtype."""

    args: object
    input_args: object | None
    scale_dtype: torch.dtype


def _store(name: str, module: nn.Linear, q, scale, zp, fmt: _Format, compressed, mask=None,
           sparse_format: str = "sparse-24-bitmask") -> None:
    compressed[name] = compress_linear(q, scale, zp, fmt.args, fmt.input_args)
    if mask is not None and sparse_format == "sparse-24-bitmask":
        compressed[name] = sparsity.compress_24(compressed[name], mask, fmt.args)
    module.weight.data.copy_(q.to(module.weight.dtype))  # later layers see the quantized layer


def _rtn(linears, fmt: _Format, compressed, opts: QuantizeOptions) -> None:
    from tqdm.auto import tqdm

    from soarllm.quant.gptq import rtn_quantize

    for name, module in tqdm(linears.items(), desc="RTN layers", unit="linear", file=sys.stderr,
                             disable=not opts.progress):
        weight, mask = module.weight.data, None
        if opts.sparsity:
            weight, mask = sparsity.prune_24(weight)  # by magnitude
        q, scale, zp = rtn_quantize(weight, fmt.args, fmt.scale_dtype)
        _store(name, module, q, scale, zp, fmt, compressed, mask, opts.sparse_format)


def _smoothquant(hf, tokenizer_dir, opts: QuantizeOptions) -> str:
    """Fold SmoothQuant's factors into the float model (the caller then rounds its weights)."""
    from soarllm.quant.activations import input_stats
    from soarllm.quant.smooth import smooth, smoothing_mappings

    mappings = smoothing_mappings(hf)  # an unsupported architecture fails before calibrating
    alpha = (DEFAULT_SMOOTHING_STRENGTH if opts.smoothing_strength is None
             else opts.smoothing_strength)
    samples = calibration_samples(tokenizer_dir, opts.calib, opts.num_samples, opts.seq_len)
    observed = {m.balance_names[0]: m.balance[0] for m in mappings}
    stats = input_stats(hf, observed, samples, opts.progress, desc="SmoothQuant calibration")
    smooth(mappings, {n: st.absmax for n, st in stats.stats.items()}, alpha)
    return f"SmoothQuant: strength {alpha} over {len(mappings)} mappings"


def _awq(hf, tokenizer_dir, fmt: _Format, compressed, opts: QuantizeOptions) -> str:
    """Layer by layer (awq.quantize_layer): each mapping's factors searched on the layer's
    calibration inputs and folded, then the weights rounded with the clip search."""
    from soarllm.quant import awq
    from soarllm.quant.gptq import SequentialCalibrator
    from soarllm.quant.smooth import decoder_layers

    _, layers = decoder_layers(hf)
    observed = {names[0] for layer in layers for names, _ in awq.input_groups(layer)}
    samples = calibration_samples(tokenizer_dir, opts.calib, opts.num_samples, opts.seq_len)
    names = {id(m): n for n, m in decoder_linears(hf).items()}
    errors: list[tuple[float, float]] = []

    def observe(name, module):
        return awq.AWQObserver(module.in_features) if name in observed else None

    def quantize_layer(index, layer, observers):
        quantized, results = awq.quantize_layer(layer, observers, fmt.args, fmt.scale_dtype)
        errors.extend((r.error, r.rtn_error) for r in results)
        logger.debug("AWQ layer %d: alphas %s", index, [r.alpha for r in results])
        for local, (q, scale, zp) in quantized.items():
            module = layer.get_submodule(local)
            _store(names[id(module)], module, q, scale, zp, fmt, compressed)

    SequentialCalibrator(hf, samples, progress=opts.progress, method="AWQ").run(
        quantize_layer, observe)
    ours, rtn = (sum(e) / len(errors) for e in zip(*errors))
    return (f"AWQ: mean relative output error of the scaled layers on the calibration text "
            f"{ours:.4f}, RTN's {rtn:.4f} (before the clip search), over {len(errors)} mappings")


def _gptq(hf, tokenizer_dir, fmt: _Format, compressed, opts: QuantizeOptions) -> None:
    from soarllm.quant.gptq import SequentialCalibrator, gptq_quantize, rtn_quantize

    samples = calibration_samples(tokenizer_dir, opts.calib, opts.num_samples, opts.seq_len)
    widest = max(m.in_features for m in decoder_linears(hf).values())
    method = "GPTQ" if opts.method == "gptq" else "Wanda"  # RTN with a Wanda mask calibrates too
    if method == "GPTQ" and samples.numel() < 16 * widest:
        logger.warning(
            "GPTQ calibrates on %d tokens, fewer than 16x the widest layer's %d inputs: it may fit "
            "the calibration text and do worse than RTN elsewhere; raise --num-samples/--seq-len",
            samples.numel(), widest)
    names = {id(m): n for n, m in decoder_linears(hf).items()}

    def quantize_layer(index, layer, accs):
        for local, acc in accs.items():
            module = layer.get_submodule(local)
            weight, mask = module.weight.data, None
            if opts.sparsity:
                weight, mask = sparsity.prune_24(weight, acc.H if opts.wanda else None)
            if opts.method == "rtn":  # RTN with a Wanda mask: calibrated for the mask only
                q, scale, zp = rtn_quantize(weight, fmt.args, fmt.scale_dtype)
            else:  # GPTQ from the unpruned weight: the pruning error is compensated too
                q, scale, zp = gptq_quantize(module.weight.data, acc.H, fmt.args, fmt.scale_dtype,
                                             damp=opts.damp, act_order=opts.act_order, mask=mask)
            _store(names[id(module)], module, q, scale, zp, fmt, compressed, mask,
                   opts.sparse_format)

    SequentialCalibrator(hf, samples, progress=opts.progress, method=method).run(quantize_layer)


def calibration_samples(tokenizer_dir, calib: str, num_samples: int, seq_len: int) -> torch.Tensor:
    """[num_samples, seq_len] token ids of calibration text, held out from `soar eval ppl`'s.

    `calib` is a comma list of 'stdlib' (standard-library files in another seeded order than the
    evaluation's, skipping the files the evaluation reads first), 'prose' (the second half of the
    Python reference text; the evaluation scores its beginning) and text files; the samples are
    shared out evenly among them, as consecutive non-overlapping windows of each.
    """
    from transformers import AutoTokenizer

    sources = [c.strip() for c in calib.split(",") if c.strip()]
    if not sources:
        raise ConfigError("--calib is empty; give stdlib, prose or a text file")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = []
    for k, source in enumerate(sources):
        n = num_samples // len(sources) + (k < num_samples % len(sources))
        if n == 0:
            continue
        text = _calibration_text(source, n * seq_len * 8)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) // seq_len < n:
            raise ConfigError(
                f"calibration text {source!r} gives {len(ids) // seq_len} windows of {seq_len} "
                f"tokens, fewer than the {n} asked of it; lower --num-samples or --seq-len, or "
                "give a longer file"
            )
        rows.append(torch.tensor(ids[: n * seq_len]).reshape(n, seq_len))
    return torch.cat(rows)


def _calibration_text(source: str, chars: int) -> str:
    from soarllm.eval.corpus import corpus_text, natural_language_text, stdlib_sources

    if source == "stdlib":
        evaluated = {f.name for f in stdlib_sources(num_files=64, seed=0)}
        parts, total = [], 0
        for f in stdlib_sources(num_files=400, seed=1):
            if f.name in evaluated:
                continue
            parts.append(f.text)
            total += len(f.text)
            if total >= chars:
                break
        return "\n\n".join(parts)[: chars * 2]
    if source == "prose":
        full = natural_language_text()
        return full[len(full) // 2 :][: chars * 2]
    return corpus_text(source)[: chars * 2]  # a file path (a clear error when it is not one)


def write_directory(out: Path, checkpoint, hf: nn.Module, compressed,
                    opts: QuantizeOptions) -> QuantizeReport:
    """config.json + tokenizer files + model.safetensors, written to a temporary directory and
    renamed to `out`. The float tensors are hf's own: norms changed by smoothing included."""
    from safetensors.torch import save_file

    dtype = DTYPES[opts.dtype]
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(checkpoint.config, "tie_word_embeddings", False))
    for name, tensor in hf.state_dict().items():
        module, suffix = name.rsplit(".", 1)
        # a compressed layer's weight is replaced by its parts below; its bias stays as it is
        if (module in compressed and suffix == "weight") or (tied and name == "lm_head.weight"):
            continue
        tensors[name] = tensor.detach().to(dtype).contiguous()
    for module, parts in compressed.items():
        for suffix, tensor in parts.items():
            tensors[f"{module}.{suffix}"] = tensor
    config = checkpoint.config.to_dict()
    config["quantization_config"] = quantization_config(opts.scheme, opts.group_size, ["lm_head"])
    if opts.sparsity:
        pruned = sum(m.weight.numel() for m in decoder_linears(hf).values()) / 2
        total = sum(p.numel() for p in hf.parameters())
        config["quantization_config"]["sparsity_config"] = sparsity.sparsity_config(
            opts.sparse_format, ["lm_head"], round(pruned / total, 4))
    config["dtype"] = opts.dtype
    config.pop("torch_dtype", None)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for src in sorted(Path(checkpoint.tokenizer_dir).iterdir()):
            if src.is_file() and src.name not in _SKIP_FILES and not src.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(src, tmp / src.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.rename(tmp, out)  # atomic on one file system; fails if out appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    return QuantizeReport(out, sorted(compressed), bytes=size)
