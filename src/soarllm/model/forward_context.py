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


@contextmanager
def set_forward_context(meta: AttentionMetadata, backend: Any) -> Iterator[None]:
    previous = getattr(_local, "ctx", None)
    _local.ctx = ForwardContext(meta, backend)
    try:
        yield
    finally:
        _local.ctx = previous


def get_forward_context() -> ForwardContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("attention ran outside set_forward_context(meta, backend): the runner "
                           "sets it around every model call")
    return ctx
