"""The forward context: what one step's attention layers need besides their tensors.

The runner sets the step's ``AttentionMetadata`` and the attention backend around the model call;
each attention layer reads them here instead of receiving them as arguments. A compiled model therefore takes only tensors
(input ids, positions, KV caches): the metadata's Python lists would otherwise become guards and
recompile the model every step. Thread-local, so engines stepping in different threads of one
process never see each other's batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from soarllm.kernels.attention import AttentionMetadata

_local = threading.local()


@dataclass
class ForwardContext:
    meta: AttentionMetadata
    backend: Any  # the attention backend: forward(q, k, v, kv_cache, meta, scale, window, softcap)
    offload: Any = None  # model/kv_offload.KVOffload when the KV cache lives in host memory


@contextmanager
def set_forward_context(meta: AttentionMetadata, backend: Any,
                        offload: Any = None) -> Iterator[None]:
    """The step's metadata and backend for the attention layers called inside. A backend with an
    ``announce_step(meta | None)`` method hears of the step as it begins and ends (the CPU
    backend hands decode rows to its C++ kernel that way)."""
    previous = getattr(_local, "ctx", None)
    _local.ctx = ForwardContext(meta, backend, offload)
    _announce(backend, meta)
    try:
        yield
    finally:
        _local.ctx = previous
        _announce(backend, None)
        if previous is not None:
            _announce(previous.backend, previous.meta)


def _announce(backend: Any, meta: AttentionMetadata | None) -> None:
    announce = getattr(backend, "announce_step", None)
    if announce is not None:
        announce(meta)


def get_forward_context() -> ForwardContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("attention ran outside set_forward_context(meta, backend): the runner "
                           "sets it around every model call")
    return ctx
