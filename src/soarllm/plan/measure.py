"""This machine, measured on the spot: matmul throughput and memory-copy bandwidth.

The figures are what a dense float32 matmul and a large tensor copy reach with PyTorch on the
default device, so they are already "achieved" numbers (efficiency factors start at 1).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

from soarllm.plan.hardware import Efficiency, Hardware


@dataclass(frozen=True)
class Measurement:
    matmul_tflops: float
    memory_bw_gbs: float
    memory_gib: float
    threads: int
    device: str
    dtype: str


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _total_memory_gib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 8.0


def measure(size: int = 1024, copy_mib: int = 256, repeats: int = 5) -> Measurement:
    """A few hundred milliseconds of matmuls and copies on the default device."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def matmul() -> None:
        torch.matmul(a, b)
        sync()

    matmul()
    t = _best_time(matmul, repeats)
    tflops = 2 * size**3 / t / 1e12

    n = copy_mib * 2**20 // 4
    src = torch.ones(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        sync()

    copy()
    t = _best_time(copy, repeats)
    bw = 2 * n * 4 / t / 1e9  # read + write
    return Measurement(
        matmul_tflops=tflops,
        memory_bw_gbs=bw,
        memory_gib=_total_memory_gib(device),
        threads=torch.get_num_threads(),
        device=device,
        dtype="bf16" if device == "cuda" else "fp32",
    )


def this_machine(m: Measurement | None = None, price_per_hour: float | None = None) -> Hardware:
    m = m or measure()
    name = f"this machine ({platform.processor() or platform.machine()}, {m.threads} threads)"
    return Hardware(
        id="this",
        name=name,
        memory_gib=m.memory_gib,
        memory_bw_gbs=m.memory_bw_gbs,
        tflops={m.dtype: m.matmul_tflops},
        max_tp=1,
        price_per_hour=price_per_hour,
        vendor="measured",
        interconnect="none",
        default_dtype=m.dtype,
        efficiency=Efficiency(compute_eff=1.0, memory_eff=1.0, step_overhead_s=0.0),
        memory_reserve_fraction=0.2,
        sources={
            "compute": f"measured: best of {m.device} {m.dtype} 1024x1024 matmuls",
            "memory bandwidth": "measured: best of 256 MiB tensor copies (read + write)",
            "memory": "total physical memory",
        },
    )
