"""Command-line flags for EngineArgs, shared by every subcommand that builds an engine.

The flags keep vLLM's names; vLLM's --gpu-memory-utilization is mapped onto --kv-cache-memory,
--trust-remote-code is accepted. No import here loads torch: `soar serve`
checks its port before anything heavy is imported.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from soarllm.cli.parser import SoarParser, add_model_argument
from soarllm.errors import ConfigError


def add_engine_args(parser: SoarParser, *, model: bool = True) -> None:
    """The model argument (unless `model` is False) and the engine group."""
    if model:
        add_model_argument(parser)
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto",
                   help="weights and activations: auto (bfloat16 on GPU and on CPUs with "
                   "AVX-512 BF16/AMX, else float32) | float32 | bfloat16 | float16")
    g.add_argument("--device", default="auto", help="auto (cuda when visible) | cpu | cuda")
    g.add_argument("--load-format", default="auto",
                   help="auto | safetensors | gguf | pt | dummy (random weights, for benchmarks)")
    g.add_argument("--quantization", "-q", default=None,
                   help="weights: unset = as the checkpoint is (a GGUF file runs on its 4-bit "
                   "blocks) | none (dequantize to --dtype) | gguf | w8a16 | w4a16 | w4a16-g64 | "
                   "w4a16-g128 | w8a8 (quantize at load, round to nearest; w8a8 also quantizes "
                   "activations per token) | densify (a 2:4 compressed-tensors checkpoint on the "
                   "dense kernels: faster, more memory)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer to use instead of the model's own (same forms as the model)")
    g.add_argument("--seed", type=int, default=0,
                   help="engine seed: random (dummy) weights and requests without their own seed")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's context length)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--max-num-seqs", type=int, default=128,
                   help="most requests running at once (the batch size)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one engine step; longer prompts are prefilled in chunks "
                   "(default: chosen from the model length)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of a prompt prefix seen before")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=True, help="split long prompts over several steps, beside decodes")
    g.add_argument("--kv-cache-memory", default=None,
                   help="KV cache size: bytes ('4GiB') or a fraction of the available memory "
                   "(0.5); refused when larger than the memory available (default: a share of "
                   "the available memory)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"),
                   help="KV cache storage: auto (the model dtype) | int8 (one scale per token "
                   "and KV head: about half the memory of bfloat16, twice the tokens cached)")
    g.add_argument("--kv-offload", action="store_true", default=None,
                   help="keep the KV cache in host memory (--kv-cache-memory then sizes it "
                   "against the host's RAM): the device holds only one layer's blocks of the "
                   "running step, so a request's KV may exceed device memory; slower (each step "
                   "moves its KV to the device once per layer), runs the model step uncompiled")
    g.add_argument("--attention-backend", default=None,
                   choices=("auto", "reference", "triton", "cpu"),
                   help="attention kernels: auto (Triton on CUDA where triton is installed, the "
                   "native CPU kernel on the CPU where a C compiler builds it, else the reference "
                   "PyTorch backend) | reference | triton | cpu (default: "
                   "$SOARLLM_ATTENTION_BACKEND, else auto)")
    g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="exact number of KV cache blocks (testing; overrides --kv-cache-memory)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="speculative decoding for every request, with vLLM's keys, e.g. "
                   """'{"method": "ngram", "num_speculative_tokens": 4}' (prompt lookup; """
                   "it turns itself off where it does not pay). Requests with a `prediction` "
                   "(Predicted Outputs) speculate without it")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=None, metavar="N",
                   help="split the model over N ranks, one process each (heads, MLP width and "
                   "vocabulary sharded; gloo on CPU, NCCL on GPU); default 1")
    g.add_argument("--enable-expert-parallel", action="store_true", default=None,
                   help="Mixture-of-Experts models: split the experts whole over the "
                   "--tensor-parallel-size ranks (rank r owns experts [r E/N, (r+1) E/N)) instead "
                   "of splitting each expert's width; attention stays tensor parallel")
    g.add_argument("--expert-dispatch", default=None, choices=("all_reduce", "all_to_all"),
                   help="with --enable-expert-parallel: all_reduce (every rank routes every "
                   "token through its experts, one all-reduce sums the ranks' parts; the "
                   "default) | all_to_all (each rank sends its share of the tokens to the ranks "
                   "owning their experts and back, then the shares are gathered; runs the model "
                   "step uncompiled)")
    g.add_argument("--context-parallel-size", "-cp", type=int, default=None, metavar="N",
                   help="split each request's tokens and KV cache over N ranks, one process each "
                   "(long prompts: ring-attention prefill, each rank holding 1/N of the KV); "
                   "with -tp T, N x T processes; default 1")
    g.add_argument("--distributed-executor-backend", default=None, choices=("uni", "mp", "ray"),
                   help="how the ranks run: uni (this process; -tp 1 only) | mp (worker "
                   "processes on this machine; the default above -tp 1) | ray (Ray actors, on "
                   "one or several nodes of a Ray cluster: RAY_ADDRESS, `ray start`, else a "
                   "local one; pip install 'soarllm[ray]'; docs/multinode.md)")
    v = parser.add_argument_group("vLLM flag names")
    v.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                   help="mapped to --kv-cache-memory FRACTION: the share of the *available* "
                   "memory given to the KV cache (vLLM: of the whole GPU, weights included)")
    v.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM compatibility; soarllm never runs code from a "
                   "checkpoint, so it changes nothing")
    v.add_argument("--enforce-eager", action="store_true", default=None,
                   help="run the model eagerly, without torch.compile: a start without the "
                   "compile warm-up, slower steps")
    parser.post_parse.append(_map_vllm_names)


def _map_vllm_names(p: SoarParser, ns: argparse.Namespace, extras: list[str]) -> list[str]:
    util = ns.__dict__.pop("gpu_memory_utilization", None)
    if util is not None:
        if ns.kv_cache_memory is not None:
            p.error("--gpu-memory-utilization and --kv-cache-memory both size the KV cache; "
                    "give one")
        if not 0 < util <= 1:
            p.error(f"--gpu-memory-utilization must be in (0, 1], got {util}")
        ns.kv_cache_memory = util
    return extras


def engine_args_from(args: argparse.Namespace):
    """EngineArgs from the parsed flags, checked against this machine before any model loads."""
    from soarllm.config import EngineArgs

    names = {f.name for f in fields(EngineArgs)}
    ea = EngineArgs(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    check_kv_cache_memory(ea)
    if ea.speculative_config is not None:
        from soarllm.spec.config import SpeculativeConfig

        SpeculativeConfig.parse(ea.speculative_config)  # a bad config fails before the model loads
    return ea


def check_kv_cache_memory(ea) -> None:
    """Refuse a KV cache size in bytes larger than the memory available now (before loading the
    model, not minutes later; on CPU the cache is mapped lazily and would be accepted)."""
    if ea.kv_cache_memory is None:
        return
    from soarllm.config import available_memory_bytes, parse_memory

    kind, value = parse_memory(ea.kv_cache_memory)
    if kind != "bytes":
        return
    device = "cpu" if ea.kv_offload else ea.resolved_device()  # offloaded: host memory
    available = available_memory_bytes(device)
    if value > available:
        raise ConfigError(
            f"--kv-cache-memory {ea.kv_cache_memory} ({value / 2**30:.1f} GiB) is more than the "
            f"{available / 2**30:.1f} GiB of memory available on {device}; give at most about "
            f"{available * 0.8 / 2**30:.1f}GiB, or a fraction of the available memory (e.g. 0.5)"
        )
