"""``soar compare MODEL_A MODEL_B``: layer-wise precision compare of two versions of a model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="layer-wise accuracy compare of two models (e.g. fp vs quantized)",
        description="Run MODEL_A and MODEL_B on the same tokens and report, per decoder layer, "
        "the cosine similarity and max/mean absolute error of the hidden states, and the top-k "
        "agreement of the final logits; name the first layer whose mean cosine drops below "
        "--threshold.",
    )
    p.add_argument("model_a", help="reference model: registry name, HF directory or .gguf file")
    p.add_argument("model_b", help="model compared with it (e.g. its soar-quantized copy)")
    p.add_argument("--quantization-a", default="none",
                   help="MODEL_A's quantization setting (engine's `quantization`; 'none' "
                   "dequantizes a GGUF file, 'auto' follows the checkpoint)")
    p.add_argument("--quantization-b", default="auto", help="MODEL_B's quantization setting")
    p.add_argument("--prompts", type=Path, default=None,
                   help="text file, one prompt per line (default: held-out stdlib and prose "
                   "snippets)")
    p.add_argument("--threshold", type=float, default=0.99,
                   help="mean cosine below which a layer counts as drifted")
    p.add_argument("--top-k", type=int, default=5, help="k of the logits' top-k agreement")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype both models run in")
    p.add_argument("--output-json", type=Path, default=None, help="also write the results here")
    p.set_defaults(func=_run)


def _prompts(args, tokenizer_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    from soarllm.errors import ConfigError
    from soarllm.quant.compare import default_prompts

    if tokenizer_dir is None:
        raise ConfigError(f"{args.model_a} has no tokenizer to encode the prompts with")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if args.prompts is None:
        return default_prompts(tok)
    if not args.prompts.is_file():
        raise ConfigError(f"--prompts {args.prompts} is not a file; give a text file with one "
                          "prompt per line")
    lines = [ln for ln in args.prompts.read_text(encoding="utf-8").splitlines() if ln.strip()]
    ids = [tok.encode(ln, add_special_tokens=False) for ln in lines]
    ids = [i for i in ids if i]
    if not ids:
        raise ConfigError(f"--prompts {args.prompts} holds no text")
    return ids


def _run(args: argparse.Namespace) -> int:
    import torch

    from soarllm.errors import ConfigError
    from soarllm.quant.compare import compare_models, load_model

    if not 0 < args.threshold <= 1:
        raise ConfigError(f"--threshold {args.threshold} must be in (0, 1], e.g. 0.99")
    if args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    dtype = getattr(torch, args.dtype)

    def quant(q):
        return None if q == "auto" else q

    a, _, tok_dir = load_model(args.model_a, quant(args.quantization_a), dtype)
    b, _, _ = load_model(args.model_b, quant(args.quantization_b), dtype)
    result = compare_models(a, b, _prompts(args, tok_dir), threshold=args.threshold,
                            k=args.top_k, names=(args.model_a, args.model_b))
    print(f"A = {args.model_a}\nB = {args.model_b}\n{result.num_tokens} tokens\n")
    print("| layer | cosine mean | cosine min | max abs err | mean abs err |")
    print("|---|---|---|---|---|")
    for d in result.layers:
        mark = " <- first drift" if d.layer == result.first_drift_layer else ""
        print(f"| {d.layer} | {d.cosine_mean:.5f} | {d.cosine_min:.5f} | {d.max_abs:.4g} | "
              f"{d.mean_abs:.4g} |{mark}")
    print(f"\nlogits: cosine {result.logits_cosine_mean:.5f}, top-1 agreement "
          f"{result.top1_agreement:.3f}, top-{result.k} agreement {result.topk_agreement:.3f}")
    if result.first_drift_layer is None:
        print(f"no layer drifts below cosine {result.threshold}")
    else:
        print(f"first layer below cosine {result.threshold}: {result.first_drift_layer}")
    if args.output_json:
        args.output_json.write_text(json.dumps(result.to_dict(), indent=1))
        print(f"wrote {args.output_json}", file=sys.stderr)
    return 0
