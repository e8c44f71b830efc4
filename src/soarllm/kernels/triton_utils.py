"""Whether Triton can be used: imported lazily, so CPU installs without it never need it."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package is importable (it is imported only when a kernel runs)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton_kernel(x: torch.Tensor) -> bool:
    """Whether a layer should call its Triton kernel for ``x``: on CUDA, with triton installed,
    and not while torch.compile traces (inductor generates its own fused kernels there)."""
    return x.is_cuda and triton_available() and not torch.compiler.is_compiling()
