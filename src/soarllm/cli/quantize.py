"""``soar quantize MODEL --scheme {w8a16,w4a16,w8a8} --method {rtn,gptq,awq,smoothquant} --out
DIR``: write a compressed-tensors checkpoint (loadable by soarllm, transformers and vLLM);
``soar quantize --analyze MODEL``: list the activation outliers of its linear layers' inputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from soarllm.cli.parser import add_model_argument

    p = subparsers.add_parser(
        "quantize", help="write a quantized checkpoint (compressed-tensors format)",
        description="Quantize every linear layer of MODEL's decoder (the LM head and embeddings "
        "stay in --dtype) and write an HF directory in the compressed-tensors format: "
        "config.json with its quantization_config, the tokenizer, model.safetensors. The "
        "directory appears whole at the end (written under a temporary name, then renamed). "
        "With --analyze, nothing is written: the calibration text runs through the float model "
        "and the linear layer inputs are listed by how far their largest channel stands above "
        "the median channel (the activation outliers that make W8A8 need SmoothQuant).",
    )
    add_model_argument(p, help="float checkpoint: registry name, HF directory or .gguf file "
                       "(a GGUF file's dequantized weights are the full-precision base)")
    p.add_argument("--scheme", choices=("w8a16", "w4a16", "w8a8"), default="w4a16",
                   help="w8a16: int8 per output channel; w4a16: int4 per group, asymmetric; "
                   "w8a8: int8 weights per output channel and int8 activations per token "
                   "(dynamic)")
    p.add_argument("--method", choices=("rtn", "gptq", "awq", "smoothquant"), default="rtn",
                   help="rtn: round to nearest; gptq (w8a16, w4a16): Hessian-based error "
                   "compensation over calibration text; awq (w4a16): activation-aware "
                   "per-channel scales searched on calibration text, then rtn; smoothquant "
                   "(w8a8): activation outliers migrated into the weights, then rtn")
    p.add_argument("--smoothing-strength", type=float, default=None, metavar="ALPHA",
                   help="smoothquant's migration strength in [0, 1] (default 0.5): the share "
                   "of each channel's activation range moved into the weights")
    p.add_argument("--group-size", type=int, default=None,
                   help="w4a16 inputs per scale: 32, 64 or 128 (default: the largest that divides "
                   "every layer's inputs)")
    p.add_argument("--calib", default="stdlib,prose",
                   help="calibration text (gptq, awq, smoothquant, --analyze), a comma list of "
                   "'stdlib', 'prose' and text files (held out from `soar eval ppl`'s text; "
                   "samples shared out evenly)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="calibration sequences (default 128; 32 with --analyze). GPTQ needs many "
                   "more calibration tokens than a layer has inputs, or it fits them and loses "
                   "to RTN on other text")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize columns in order of decreasing Hessian diagonal")
    p.add_argument("--damp", type=float, default=0.01,
                   help="GPTQ damping, as a fraction of the mean Hessian diagonal")
    p.add_argument("--sparsity", default=None, metavar="2:4",
                   help="also prune 2 of every 4 consecutive inputs of each layer before "
                   "quantizing (stored compressed: kept values + bitmask)")
    p.add_argument("--prune", choices=("magnitude", "wanda"), default=None,
                   help="--sparsity selection: |W|, or Wanda's |W| * ||X|| over the calibration "
                   "text (default: wanda with gptq, magnitude with rtn)")
    p.add_argument("--sparse-format", choices=("sparse-24-bitmask", "dense"),
                   default="sparse-24-bitmask",
                   help="dense: store the zeros in the ordinary tensors (no smaller, but "
                   "transformers and vLLM read it)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the scales and of the tensors left unquantized")
    p.add_argument("--out", type=Path, default=None,
                   help="directory to create (must not exist); required unless --analyze")
    p.add_argument("--analyze", action="store_true",
                   help="write nothing: list each linear layer input's activation outlier "
                   "channels over the calibration text")
    p.add_argument("--json", action="store_true", help="--analyze: print JSON instead of a table")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars on stderr")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from soarllm.errors import ConfigError
    from soarllm.quant.quantize import QuantizeOptions, check_out, quantize_model

    if args.analyze:
        if args.out is not None:
            raise ConfigError("--analyze writes nothing; leave out --out (or drop --analyze "
                              "to quantize)")
    elif args.out is None:
        raise ConfigError("--out is required: the directory to write the quantized checkpoint "
                          "to (or give --analyze to only list activation outliers)")
    elif args.json:
        raise ConfigError("--json applies to --analyze only")
    else:
        check_out(args.out.absolute())  # before any loading
    num_samples = args.num_samples if args.num_samples is not None else (
        32 if args.analyze else 128)
    opts = QuantizeOptions(
        scheme=args.scheme, method=args.method, group_size=args.group_size, calib=args.calib,
        num_samples=num_samples, seq_len=args.seq_len, dtype=args.dtype,
        act_order=args.act_order, damp=args.damp, smoothing_strength=args.smoothing_strength,
        progress=args.progress, sparsity=args.sparsity, prune=args.prune,
        sparse_format=args.sparse_format,
    )
    if args.analyze:
        return _analyze(args, opts)
    report = quantize_model(args.model, args.out, opts)
    what = f"w4a16 group {opts.group_size}" if args.scheme == "w4a16" else args.scheme
    if args.sparsity:
        what += f" 2:4 ({opts.sparse_format})"
    print(f"wrote {report.out} ({report.bytes / 2**20:.1f} MiB): {len(report.quantized)} linear "
          f"layers {what} by {args.method}, in {report.seconds:.0f} s", file=sys.stderr)
    if report.summary:
        print(report.summary, file=sys.stderr)
    return 0


def _analyze(args: argparse.Namespace, opts) -> int:
    import json

    from soarllm.quant.analyze import as_json, format_table
    from soarllm.quant.quantize import analyze_model

    rows = analyze_model(args.model, opts)
    if args.json:
        print(json.dumps(as_json(rows), indent=1))
    else:
        print(format_table(rows))
    return 0
