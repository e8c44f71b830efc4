"""`soar quantize --analyze`: which linear layer inputs carry activation outliers.

A few input channels of an LLM's linear layers reach magnitudes far above the rest (Dettmers et
al., 2022; Xiao et al., 2023). One int8 scale per token must then cover the outlier, and the
other channels keep only a few levels: the reason W8A8 needs SmoothQuant. For each distinct layer
input, over calibration text, the report gives max|x_j| per channel j against the median
channel's max, the channels furthest above it, and sorts the inputs by that ratio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from soarllm.quant.activations import InputStats

TOP_CHANNELS = 5


@dataclass
class InputOutliers:
    """The outlier figures of one layer input (read by `layers`)."""

    layers: list[str]
    channels: int
    max: float  # max over channels of max|x_j|
    median: float  # median over channels of max|x_j|
    ratio: float  # max / median
    top: list[tuple[int, float]]  # (channel, its max|x_j| / median), largest first

    @property
    def name(self) -> str:
        if len(self.layers) == 1:
            return self.layers[0]
        parent = self.layers[0].rsplit(".", 1)[0]
        leaves = [n.rsplit(".", 1)[-1] for n in self.layers]
        return f"{parent}.{{{','.join(leaves)}}}"


def outliers(stats: InputStats, top: int = TOP_CHANNELS) -> list[InputOutliers]:
    """One row per distinct input, the largest max/median ratio first."""
    rows = []
    for names in stats.shared:
        absmax = stats.stats[names[0]].absmax
        median = absmax.median().item()
        ratios = absmax / median if median > 0 else torch.full_like(absmax, float("inf"))
        values, channels = ratios.topk(min(top, absmax.numel()))
        peak = absmax.max().item()
        rows.append(InputOutliers(
            layers=names, channels=absmax.numel(), max=peak, median=median,
            ratio=peak / median if median > 0 else float("inf"),
            top=[(int(c), float(v)) for c, v in zip(channels, values)],
        ))
    rows.sort(key=lambda r: r.ratio, reverse=True)
    return rows


def format_table(rows: list[InputOutliers]) -> str:
    """A plain-text table of the rows."""
    header = ("layer input", "channels", "max|x|", "median", "max/median",
              "top channels (channel: x median)")
    body = [(r.name, str(r.channels), f"{r.max:.3g}", f"{r.median:.3g}", f"{r.ratio:.1f}",
             ", ".join(f"{c}: {v:.1f}" for c, v in r.top)) for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = []
    for k, line in enumerate([header, *body]):
        cells = [cell.ljust(w) if i in (0, 5) else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def as_json(rows: list[InputOutliers]) -> list[dict]:
    return [{"input": r.name, **asdict(r), "top": [list(t) for t in r.top]} for r in rows]
