"""Per-channel statistics of the decoder linear layers' inputs over calibration text, from one
pass of the float model: what SmoothQuant's factors and `soar quantize --analyze` read.

Linear layers fed the very same tensor (q/k/v from one norm, gate/up from another) are recorded
as sharing an input, so a report lists that input once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ChannelStats:
    """Running max|x_j| and mean|x_j| per input channel j over every token seen."""

    absmax: torch.Tensor
    abssum: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        return cls(torch.zeros(channels), torch.zeros(channels, dtype=torch.float64))

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).float().abs()
        torch.maximum(self.absmax, a.amax(dim=0), out=self.absmax)
        self.abssum += a.sum(dim=0, dtype=torch.float64)
        self.tokens += a.shape[0]

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.tokens, 1)).float()


@dataclass
class InputStats:
    """Each decoder linear's input statistics, and which linears read the same input."""

    stats: dict[str, ChannelStats]
    shared: list[list[str]] = field(default_factory=list)  # names reading one tensor, in order


@torch.no_grad()
def input_stats(model: nn.Module, linears: dict[str, nn.Linear], samples: torch.Tensor,
                progress: bool = True, desc: str = "activation statistics") -> InputStats:
    """Run each calibration sample ([num_samples, seq_len] token ids) through `model`, recording
    every linear of `linears` (checkpoint name -> module) on its input."""
    from tqdm.auto import tqdm

    stats = {n: ChannelStats.empty(m.in_features) for n, m in linears.items()}
    first: dict[str, int] = {}  # name -> id of the first input it saw
    seen: list[torch.Tensor] = []  # those inputs, alive until the first sample ends (ids unique)

    def hook(name):
        def record(_module, args):
            x = args[0]
            stats[name].add(x)
            if name not in first:
                first[name] = id(x)
                seen.append(x)
        return record

    decoder = getattr(model, "model", model)  # the LM head's output is not needed
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for k, ids in enumerate(tqdm(samples, desc=desc, unit="sample", file=sys.stderr,
                                     disable=not progress)):
            decoder(input_ids=ids[None], use_cache=False)
            if k == 0:
                seen.clear()
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name in linears:
        groups.setdefault(first.get(name, id(name)), []).append(name)
    return InputStats(stats, list(groups.values()))
