"""Engine arguments (vLLM's names) and the derived configs each layer reads."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from soarllm.errors import ConfigError
from soarllm.hub import DEFAULT_MODEL  # the registry names the default model

if TYPE_CHECKING:
    import torch

# torch is imported where a dtype or a device is resolved, not here: `soar serve` reads its
# engine arguments and starts the model's worker process before it imports torch itself (~1 s).
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX BF16 instructions); read
    once per process."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # GPUs and CPUs with native bfloat16 arithmetic (AVX-512 BF16, AMX) run bfloat16: half the
        # weight and KV traffic. Other CPUs would emulate it slowly and run float32.
        if device != "cpu" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    try:
        return getattr(torch, _DTYPES[dtype])
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16"
        ) from None


@dataclass
class EngineArgs:
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    load_format: str = "auto"  # auto | safetensors | gguf | pt | dummy
    # None: as the checkpoint is (a GGUF file runs quantized) | none | gguf | w8a16 | w4a16[-gN] | w8a8
    quantization: str | None = None
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # KV cache size: bytes (int or "4GiB") or a fraction (0 < x <= 1) of free memory.
    kv_cache_memory: float | int | str | None = None
    num_gpu_blocks_override: int | None = None
    # KV cache storage (vLLM's name): "auto" = the model dtype, "int8" = int8 with one scale per
    # token and KV head (about half the memory of bfloat16)
    kv_cache_dtype: str = "auto"
    # Keep the KV cache in host memory (kv_cache_memory then sizes it against the host's RAM); the
    # device holds only one layer's blocks of the running step (model/kv_offload.py)
    kv_offload: bool = False
    # Expert parallel: how tokens reach the ranks owning their experts. "all_reduce": every rank
    # routes every token through its own experts and one all-reduce sums the ranks' parts;
    # "all_to_all": each rank sends its share of the tokens to the experts' ranks and back
    expert_dispatch: str = "all_reduce"
    # Attention kernels: None/"auto" (Triton on CUDA where installed, the native CPU kernel on the
    # CPU where it builds, else the reference PyTorch backend) | "reference" | "triton" | "cpu".
    # The default comes from SOARLLM_ATTENTION_BACKEND when set.
    attention_backend: str | None = field(
        default_factory=lambda: os.environ.get("SOARLLM_ATTENTION_BACKEND") or None)
    revision: str | None = None
    trust_remote_code: bool = False
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    # Speculative decoding (vLLM's names): {"method": "ngram", "num_speculative_tokens": 4, ...},
    # a dict or its JSON text. None: only requests with a `prediction` speculate.
    speculative_config: dict[str, Any] | str | None = None
    # Run the model eagerly instead of compiling it with torch.compile (vLLM's name). The default
    # comes from SOARLLM_ENFORCE_EAGER=1 when set (the test suite sets it: compiling every tiny
    # engine would cost minutes).
    enforce_eager: bool = field(default_factory=lambda: os.environ.get("SOARLLM_ENFORCE_EAGER") == "1")
    # Where an earlier start saved the compiled model step: run the model eagerly from the first
    # request and switch to the compiled step once a background thread has loaded it (~2 s on
    # two cores) instead of loading it first. `soar serve` turns it on (answering sooner after a
    # restart); offline use keeps the compiled step from the first token. One process only
    # (tensor/context parallel ranks load before serving).
    load_compiled_in_background: bool = False
    # Tensor parallelism (vLLM's names): ranks the model is split over, one process each, and how
    # they run: "uni" (one process; world size 1 only) | "mp" (worker processes on this machine;
    # the default above world size 1) | "ray" (Ray actors, one or several nodes; the `ray`
    # extra). None: chosen from the world size.
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    # Expert parallelism (vLLM's name): a Mixture-of-Experts model's experts split whole over the
    # tensor_parallel_size ranks (rank r owns experts [r E/N, (r+1) E/N)) instead of each expert's
    # width; attention and dense layers stay tensor parallel
    enable_expert_parallel: bool = False
    # Context parallelism (long prompts): ranks a request's tokens and KV cache are split over,
    # one mp worker each (token p on rank p % N); prefill by ring attention, decode merged across
    # ranks (kernels/context_parallel_attention.py). Tensor parallel size 1 only.
    context_parallel_size: int = 1
    # torch threads of each worker process (mp / ray); None: the cores / ranks on that machine
    worker_threads: int | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(
                f"unknown engine argument(s) {unknown}; known ones are {sorted(names)}"
            )
        return cls(**kwargs)

    @property
    def tokens_per_block(self) -> int:
        """Tokens one KV block holds for the scheduler: ``block_size`` slots on every
        context-parallel rank, each rank storing its share of the block's tokens."""
        return self.block_size * self.context_parallel_size

    def resolved_device(self) -> str:
        if self.device == "cpu" or (self.device == "auto" and not gpu_driver_present()):
            return "cpu"  # without torch's import (~1 s): no GPU driver, no CUDA device
        import torch

        if self.device != "auto":
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise ConfigError("device='cuda' was asked for but no CUDA device is visible")
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class CacheConfig:
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_memory(value: float | int | str) -> tuple[str, float]:
    """Return ("fraction", x) or ("bytes", n) for a kv_cache_memory setting."""
    if isinstance(value, str):
        s = value.strip().lower().replace(" ", "")
        num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = s[len(num):]
        if unit not in _UNITS or not num:
            raise ConfigError(
                f"cannot read kv_cache_memory={value!r}; give bytes like '4GiB' or a fraction like 0.5"
            )
        value = float(num) * _UNITS[unit]
        if unit:
            return "bytes", value
    value = float(value)
    if value <= 0:
        raise ConfigError(f"kv_cache_memory must be positive, got {value}")
    if value <= 1:
        return "fraction", value
    return "bytes", value


def gpu_driver_present() -> bool:
    """Whether a GPU driver's device files exist (NVIDIA's, AMD's ROCm, WSL's): without one,
    torch.cuda.is_available() is False, known without importing torch."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))


def available_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
