"""Triton kernels run under the Triton interpreter on machines without CUDA. The variable must be
set before any module defining @triton.jit kernels is imported, hence here, at collection."""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_for_numpy_2_4() -> None:
    """triton-lang/triton#9171: under numpy >= 2.4 the interpreter's int() of a scalar (a 1-element
    array) fails, so loops bounded by a loaded value (range(lo, hi, BLOCK)) raise TypeError. The
    upstream fix squeezes the array first; this applies the same to the installed triton."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_soarllm_squeeze", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._soarllm_squeeze = True
    interpreter._patch_lang_tensor = patched


def _patch_interpreter_bf16_dot() -> None:
    """The interpreter (triton 3.6) multiplies bfloat16 tl.dot operands as their raw uint16 bits
    (it stores bfloat16 as uint16); widen them to float32 first, which is exact."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot
    if getattr(dot, "_soarllm_bf16", False):
        return

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return dot(self, widen(a), widen(b), d, *args)

    create_dot._soarllm_bf16 = True
    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton"):
    _patch_interpreter_for_numpy_2_4()
    _patch_interpreter_bf16_dot()
