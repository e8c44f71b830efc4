"""Triton kernels run under the Triton interpreter on machines without CUDA. The variable must be
set before any module defining @triton.jit kernels is imported, hence here, at collection."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
