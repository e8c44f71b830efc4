"""Registering soarllm's operators with PyTorch's dispatcher, the lean way.

``torch.library.custom_op`` wraps every call in Python machinery (argument checks, autograd
plumbing) that costs ~70 us per call on a 2-core CPU: the attention op runs once per layer per
step, so a 30-layer model paid ~2 ms of a ~13 ms batch-1 decode step for it. The low-level
``torch.library.Library`` registration below gives the same thing to ``torch.compile`` (an opaque
op with a schema, mutated arguments marked ``Tensor(a!)``, and a fake implementation for tracing)
at ~10 us per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("soarllm", "FRAGMENT")


def define_op(name: str, schema: str, impl: Callable, fake: Callable) -> None:
    """Register ``torch.ops.soarllm.<name>``: ``schema`` is the argument list and return type in
    PyTorch's schema language, e.g. ``"(Tensor x, int n) -> Tensor"``; ``impl`` runs on every
    device, ``fake`` returns empty tensors of the output's shape for tracing."""
    _LIBRARY.define(name + schema)
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"soarllm::{name}", fake, lib=_LIBRARY)
