"""The plan as a Markdown table and a PNG plot."""

from __future__ import annotations

from pathlib import Path

from soarllm.plan.planner import PlanRequest, PlanRow, Quadrant


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render_plan(req: PlanRequest, rows: list[PlanRow], quad: Quadrant) -> str:
    m = req.model
    lines = [
        f"# soar plan: {m.name} ({m.num_params / 1e9:.2f} B parameters)",
        "",
        f"Input {req.input_len} / output {req.output_len} tokens; SLO TTFT <= "
        f"{req.slo_ttft_ms:g} ms, TPOT <= {req.slo_tpot_ms:g} ms; quant {req.quant or 'none'}, "
        f"KV {req.kv_dtype or 'as compute dtype'}.",
        "",
        "| hardware | TP | precision | weights GiB/dev | max batch (memory) | batch @SLO | "
        "TTFT ms | TPOT ms | decode bound | tok/s/device | $/M tok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        batch = str(r.batch) if r.meets_slo else ("no fit" if not r.fits else "misses SLO")
        lines.append(
            f"| {r.hardware_name} | {r.tp} | {r.precision} | {r.weights_gib_per_device:.2f} | "
            f"{r.max_batch_by_memory} | {batch} | {r.ttft_ms:.1f} | {r.tpot_ms:.2f} | "
            f"{r.decode_bound} | {r.tokens_per_s_per_device:.1f} | "
            f"{_num(r.cost_per_m_tokens, '.3f')} |"
        )
    lines += ["", f"**Quadrant: {quad.size} model x {quad.latency} latency.** {quad.advice}", ""]
    if quad.best_cost:
        b = quad.best_cost
        lines.append(f"- Cheapest meeting the SLO: {b.hardware_name}, TP={b.tp}, batch {b.batch}, "
                     f"${b.cost_per_m_tokens:.3f} per million output tokens.")
    if quad.best_latency:
        b = quad.best_latency
        lines.append(f"- Lowest TPOT: {b.hardware_name}, TP={b.tp}: {b.tpot_ms:.2f} ms.")
    if not quad.best_latency:
        lines.append("- No hardware in the catalog meets this SLO: relax it or quantize.")
    lines += ["", "TTFT assumes the batch's prompts arrive together (one prefill step); TPOT is a "
              "decode step at mid-output context. Efficiency factors come from the catalog or a "
              "calibration (`soar plan --calibrate`).", ""]
    return "\n".join(lines)


def plot_plan(req: PlanRequest, rows: list[PlanRow], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.meets_slo]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * max(len(shown), 4) + 1.5))
    labels = [f"{r.hardware} TP={r.tp}" for r in shown]
    axes[0].barh(labels, [r.tokens_per_s_per_device for r in shown], color="tab:blue")
    axes[0].set_xlabel("output tokens/s per device (at the largest batch meeting the SLO)")
    axes[1].barh(labels, [r.cost_per_m_tokens or 0 for r in shown], color="tab:orange")
    axes[1].set_xlabel("USD per million output tokens")
    for ax in axes:
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{req.model.name}: in {req.input_len} / out {req.output_len}, "
                 f"TTFT <= {req.slo_ttft_ms:g} ms, TPOT <= {req.slo_tpot_ms:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
