"""Command-line flags for EngineArgs, shared by every subcommand that builds an engine."""

from __future__ import annotations

import argparse
from dataclasses import fields

from soarllm.config import DEFAULT_MODEL, EngineArgs


def add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = True) -> None:
    if model_positional:
        parser.add_argument(
            "model", nargs="?", default=DEFAULT_MODEL,
            help=f"registry name, HF directory, .gguf file or hub id (default: {DEFAULT_MODEL})",
        )
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--load-format", default="auto", help="auto | safetensors | gguf | pt | dummy")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument(
        "--kv-cache-memory", default=None,
        help="KV cache size: bytes ('4GiB') or a fraction of free memory (0.5)",
    )


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    names = {f.name for f in fields(EngineArgs)}
    return EngineArgs(**{k: v for k, v in vars(args).items() if k in names and v is not None})
