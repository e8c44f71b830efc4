"""``soar quantize MODEL --scheme {w8a16,w4a16} --method {rtn,gptq} --out DIR``: write a
compressed-tensors checkpoint (loadable by soarllm, transformers and vLLM)."""

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
        "directory appears whole at the end (written under a temporary name, then renamed).",
    )
    add_model_argument(p, help="float checkpoint: registry name, HF directory or .gguf file "
                       "(a GGUF file's dequantized weights are the full-precision base)")
    p.add_argument("--scheme", choices=("w8a16", "w4a16"), default="w4a16",
                   help="w8a16: int8 per output channel; w4a16: int4 per group, asymmetric")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="rtn: round to nearest; gptq: Hessian-based error compensation over "
                   "calibration text")
    p.add_argument("--group-size", type=int, default=None,
                   help="w4a16 inputs per scale: 32, 64 or 128 (default: the largest that divides "
                   "every layer's inputs)")
    p.add_argument("--calib", default="stdlib,prose",
                   help="GPTQ calibration text, a comma list of 'stdlib', 'prose' and text files "
                   "(held out from `soar eval ppl`'s text; samples shared out evenly)")
    p.add_argument("--num-samples", type=int, default=128,
                   help="GPTQ calibration sequences (GPTQ needs many more calibration tokens "
                   "than a layer has inputs, or it fits them and loses to RTN on other text)")
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
    p.add_argument("--out", type=Path, required=True, help="directory to create (must not exist)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars on stderr")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from soarllm.quant.quantize import QuantizeOptions, check_out, quantize_model

    check_out(args.out.absolute())  # before any loading
    opts = QuantizeOptions(
        scheme=args.scheme, method=args.method, group_size=args.group_size, calib=args.calib,
        num_samples=args.num_samples, seq_len=args.seq_len, dtype=args.dtype,
        act_order=args.act_order, damp=args.damp, progress=args.progress,
        sparsity=args.sparsity, prune=args.prune, sparse_format=args.sparse_format,
    )
    report = quantize_model(args.model, args.out, opts)
    what = args.scheme if args.scheme == "w8a16" else f"w4a16 group {opts.group_size}"
    if args.sparsity:
        what += f" 2:4 ({opts.sparse_format})"
    print(f"wrote {report.out} ({report.bytes / 2**20:.1f} MiB): {len(report.quantized)} linear "
          f"layers {what} by {args.method}, in {report.seconds:.0f} s", file=sys.stderr)
    return 0
