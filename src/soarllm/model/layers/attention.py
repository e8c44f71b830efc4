"""The attention layer: one paged-attention call per decoder layer, through the step's backend.

Models hand it rotated q, k, v and their layer's KV cache; the step's metadata and the backend come
from the forward context. Eagerly it calls the backend directly. Under ``torch.compile`` it goes
through the custom op ``soarllm::attention``, which the compiler keeps as one opaque call (vLLM's
piecewise idea): everything between two attention calls is fused and compiled, attention itself
stays the backend's code, and the compiled graph never sees the metadata. The op's arguments are
tensors and the layer's constants only, so structurally identical layers compile to one region.
"""

from __future__ import annotations

import torch
from torch import nn

from soarllm.kernels.ops import define_op
from soarllm.model.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(self, scale: float, sliding_window: int | None = None,
                 softcap: float | None = None):
        super().__init__()
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap

    def fuses_rope(self, q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether ``forward(..., rope=cos_sin)`` may hand q and k over unrotated: the step's
        backend then rotates them in the kernel that writes the KV cache (Triton on CUDA, float
        caches: one launch per layer instead of two). Never while compiling."""
        if torch.compiler.is_compiling() or not q.is_cuda or kv_cache.dtype == torch.int8:
            return False
        return getattr(get_forward_context().backend, "fuses_rope", False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]; writes k, v into ``kv_cache``. With
        ``rope`` (cos, sin rows of the batch's positions; only where ``fuses_rope``) q and k
        are rotated in place first, by the backend."""
        if rope is not None:
            return _attend(q, k, v, kv_cache, self.scale, self.sliding_window, self.softcap, rope)
        if torch.compiler.is_compiling():
            return torch.ops.soarllm.attention(q, k, v, kv_cache, self.scale, self.sliding_window,
                                               self.softcap)
        return _attend(q, k, v, kv_cache, self.scale, self.sliding_window, self.softcap)


def _attend(q, k, v, kv_cache, scale, sliding_window, softcap, rope=None):
    ctx = get_forward_context()
    extra = {} if rope is None else {"rope": rope}
    if ctx.offload is None:
        return ctx.backend.forward(q, k, v, kv_cache, ctx.meta, scale, sliding_window, softcap,
                                   **extra)
    # the cache lives in host memory: attend over this layer's blocks of the step, staged
    staged = ctx.offload.fetch(kv_cache)
    out = ctx.backend.forward(q, k, v, staged, ctx.meta, scale, sliding_window, softcap, **extra)
    ctx.offload.store(kv_cache, staged)
    return out


_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, float scale, int? sliding_window, "
           "float? softcap) -> Tensor")


def _fake(q, k, v, kv_cache, scale, sliding_window, softcap):
    return torch.empty_like(q)


define_op("attention", _SCHEMA, _attend, _fake)
# The same in Python under a second name: where the CPU backend's C++ kernel of the op is loaded
# (kernels/csrc/attention_op.cpp, for compiled decode steps), it hands every other call to this.
define_op("attention_ref", _SCHEMA, _attend, _fake)
