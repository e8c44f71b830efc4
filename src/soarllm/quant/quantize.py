"""`soar quantize`: a model's float weights -> a compressed-tensors HF directory.

The float weights are the checkpoint's own (a GGUF file's dequantized, the "full precision" base
of the default model) in a transformers model built from the same config; every nn.Linear of the
decoder layers is quantized (round to nearest, or GPTQ over calibration text), the LM head and
the embeddings are left in `dtype`. The directory (config.json with the quantization_config,
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
    compress_linear,
    quantization_config,
    weight_args,
)
from soarllm.quant.w4a16 import GROUP_SIZES

logger = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")
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
    progress: bool = True
    seed: int = 0
    sparsity: str | None = None  # "2:4": prune before quantizing (quant/sparsity.py)
    prune: str | None = None  # magnitude | wanda; unset: wanda with GPTQ, magnitude with RTN
    sparse_format: str = "sparse-24-bitmask"  # or "dense" (zeros stored, readable everywhere)

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown scheme {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.scheme == "w8a16" and self.group_size is not None:
            raise ConfigError("--group-size applies to w4a16 only (w8a16 has one scale per "
                              "output channel); leave it out")
        if self.scheme == "w4a16" and self.group_size is not None:
            if self.group_size not in GROUP_SIZES:
                raise ConfigError(f"group size {self.group_size} is not supported; use one of "
                                  f"{', '.join(map(str, GROUP_SIZES))}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if (self.method == "gptq" or self.prune == "wanda") and (self.num_samples < 1
                                                                 or self.seq_len < 2):
            raise ConfigError("GPTQ and Wanda need --num-samples >= 1 and --seq-len >= 2")
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


def check_out(out: Path) -> None:
    if out.exists():
        raise ConfigError(f"--out {out} already exists; remove it or choose another directory")
    if not out.parent.is_dir():
        raise ConfigError(f"the parent of --out {out} does not exist; create {out.parent} first")


def quantize_model(model: str, out: str | Path, opts: QuantizeOptions) -> QuantizeReport:
    opts.check()
    out = Path(out).absolute()
    check_out(out)
    from soarllm.model.loader import load_checkpoint

    t0 = time.perf_counter()
    checkpoint = load_checkpoint(model)
    qc = getattr(checkpoint.config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ConfigError(f"{checkpoint.path} is already quantized ({method}); give a float "
                          "checkpoint (or a GGUF file) to quantize")
    if checkpoint.tokenizer_dir is None:
        raise ConfigError(f"{checkpoint.path} has no tokenizer files; the written directory "
                          "would not load. Give a model directory with its tokenizer")
    hf = float_model(checkpoint)
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
    scale_dtype = DTYPES[opts.dtype]
    compressed: dict[str, dict[str, torch.Tensor]] = {}
    if opts.method == "rtn" and not opts.wanda:
        _rtn(linears, args, scale_dtype, compressed, opts)
    else:
        _gptq(hf, checkpoint, args, scale_dtype, compressed, opts)
    report = write_directory(out, checkpoint, hf, compressed, opts, args)
    report.seconds = time.perf_counter() - t0
    return report


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


def _store(name: str, module: nn.Linear, q, scale, zp, args, compressed, mask=None,
           sparse_format: str = "sparse-24-bitmask") -> None:
    compressed[name] = compress_linear(q, scale, zp, args)
    if mask is not None and sparse_format == "sparse-24-bitmask":
        compressed[name] = sparsity.compress_24(compressed[name], mask, args)
    module.weight.data.copy_(q.to(module.weight.dtype))  # later layers see the quantized layer


def _rtn(linears, args, scale_dtype, compressed, opts: QuantizeOptions) -> None:
    from tqdm.auto import tqdm

    from soarllm.quant.gptq import rtn_quantize

    for name, module in tqdm(linears.items(), desc="RTN layers", unit="linear", file=sys.stderr,
                             disable=not opts.progress):
        weight, mask = module.weight.data, None
        if opts.sparsity:
            weight, mask = sparsity.prune_24(weight)  # by magnitude
        q, scale, zp = rtn_quantize(weight, args, scale_dtype)
        _store(name, module, q, scale, zp, args, compressed, mask, opts.sparse_format)


def _gptq(hf, checkpoint, args, scale_dtype, compressed, opts: QuantizeOptions) -> None:
    from soarllm.quant.gptq import SequentialCalibrator, gptq_quantize, rtn_quantize

    samples = calibration_samples(checkpoint.tokenizer_dir, opts.calib, opts.num_samples,
                                  opts.seq_len)
    widest = max(m.in_features for m in decoder_linears(hf).values())
    if samples.numel() < 16 * widest:
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
                q, scale, zp = rtn_quantize(weight, args, scale_dtype)
            else:  # GPTQ from the unpruned weight: the pruning error is compensated too
                q, scale, zp = gptq_quantize(module.weight.data, acc.H, args, scale_dtype,
                                             damp=opts.damp, act_order=opts.act_order, mask=mask)
            _store(names[id(module)], module, q, scale, zp, args, compressed, mask,
                   opts.sparse_format)

    SequentialCalibrator(hf, samples, progress=opts.progress).run(quantize_layer)


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


def write_directory(out: Path, checkpoint, hf: nn.Module, compressed, opts: QuantizeOptions,
                    args) -> QuantizeReport:
    """config.json + tokenizer files + model.safetensors, written to a temporary directory and
    renamed to `out`."""
    from safetensors.torch import save_file

    dtype = DTYPES[opts.dtype]
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(checkpoint.config, "tie_word_embeddings", False))
    for name, tensor in hf.state_dict().items():
        module, suffix = name.rsplit(".", 1)
        if module in compressed or (tied and name == "lm_head.weight"):
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
