"""PNG plots of a benchmark document: endpoints side by side.

* ``latency_throughput.png``: median TTFT and median TPOT against output tokens/s, one line per
  endpoint through its load points.
* ``distributions.png``: the empirical CDF of TTFT and of TPOT per endpoint, one column per load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_throughput(doc: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ep in doc["endpoints"]:
        xs = [run["metrics"]["output_throughput"] for run in ep["runs"]]
        for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
            ys = [run["metrics"][key]["median"] for run in ep["runs"]]
            ax.plot(xs, ys, marker="o", label=ep["label"])
            for x, y, run in zip(xs, ys, ep["runs"]):
                ax.annotate(run["load"]["label"], (x, y), fontsize=7, alpha=0.7,
                            xytext=(3, 3), textcoords="offset points")
    for ax, name in zip(axes, ("median TTFT (ms)", "median TPOT (ms)")):
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("latency vs throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _per_request(run: dict[str, Any], key: str) -> list[float]:
    values = []
    for r in run["requests"]:
        if not r["success"]:
            continue
        if key == "ttft":
            values.append(r["ttft"] * 1000)
        elif r["output_tokens"] > 1:
            values.append((r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) * 1000)
    return values


def plot_distributions(doc: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    loads: list[str] = []
    for ep in doc["endpoints"]:
        for run in ep["runs"]:
            if run["load"]["label"] not in loads:
                loads.append(run["load"]["label"])
    cols = max(1, len(loads))
    fig, axes = plt.subplots(2, cols, figsize=(3.6 * cols + 1, 6.5), squeeze=False)
    for ep in doc["endpoints"]:
        for run in ep["runs"]:
            col = loads.index(run["load"]["label"])
            for row, key in enumerate(("ttft", "tpot")):
                values = np.sort(_per_request(run, key))
                if len(values):
                    cdf = np.arange(1, len(values) + 1) / len(values)
                    axes[row][col].step(values, cdf, where="post", label=ep["label"])
    for col, load in enumerate(loads):
        for row, name in enumerate(("TTFT (ms)", "TPOT (ms)")):
            ax = axes[row][col]
            ax.set_title(load if row == 0 else "", fontsize=9)
            ax.set_xlabel(name)
            ax.set_ylabel("fraction of requests" if col == 0 else "")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle("TTFT and TPOT distributions (empirical CDF)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    return [
        plot_latency_throughput(doc, out_dir / "latency_throughput.png"),
        plot_distributions(doc, out_dir / "distributions.png"),
    ]
