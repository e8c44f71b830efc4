"""The plan as Markdown tables (TP sweep, layouts for a device budget, context parallel) and a
PNG plot."""

from __future__ import annotations

from pathlib import Path

from soarllm.plan.layouts import HoldRow, LayoutPlan
from soarllm.plan.long_context import ContextParallelRow
from soarllm.plan.model_shape import ModelShape
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


def render_layouts(req: PlanRequest, lp: LayoutPlan, hold: list[HoldRow],
                   batch: int) -> str:
    """Layouts of ``lp.devices`` devices per hardware, the recommendation, and the devices needed
    just to hold the model."""
    m = req.model
    size = f"{m.num_params / 1e9:.1f} B parameters"
    if m.is_moe:
        size += (f", {m.num_active_params / 1e9:.1f} B active ({m.experts_per_token} of "
                 f"{m.num_experts} experts)")
    kv = "MLA latent" if m.is_mla else f"GQA {m.num_kv_heads} KV heads"
    lines = [
        f"# soar plan: {m.name} on {lp.devices} devices ({size}; KV: {kv})",
        "",
        f"Input {req.input_len} / output {req.output_len} tokens; SLO TTFT <= "
        f"{req.slo_ttft_ms:g} ms, TPOT <= {req.slo_tpot_ms:g} ms; quant {req.quant or 'none'}, "
        f"KV {req.kv_dtype or 'as compute dtype'}. Batch and tok/s are over all replicas.",
        "",
        "| hardware | layout | nodes | weights GiB/dev | max batch (memory) | batch @SLO | "
        "TTFT ms | TPOT ms | comm ms/step | expert GiB/step | tok/s | tok/s/device | $/M tok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lp.rows:
        batch_s = str(r.batch) if r.meets_slo else ("no fit" if not r.fits else "misses SLO")
        cross = " (TP across nodes)" if r.tp_spans_nodes else ""
        lines.append(
            f"| {r.hardware_name} | {r.layout}{cross} | {r.nodes} | "
            f"{r.weights_gib_per_device:.1f} | {r.max_batch_by_memory} | {batch_s} | "
            f"{r.ttft_ms:.0f} | {r.tpot_ms:.2f} | {r.comm_ms_per_decode_step:.2f} | "
            f"{r.expert_gib_per_decode_step:.2f} | {r.output_tokens_per_s:.0f} | "
            f"{r.tokens_per_s_per_device:.1f} | {_num(r.cost_per_m_tokens, '.3f')} |")
    lines.append("")
    for r in lp.recommended.values():
        lines.append(f"- **Recommended on {r.hardware_name}: {r.layout}**, batch {r.batch}, "
                     f"TTFT {r.ttft_ms:.0f} ms, TPOT {r.tpot_ms:.2f} ms, "
                     f"{r.tokens_per_s_per_device:.1f} tok/s/device, "
                     f"${_num(r.cost_per_m_tokens, '.3f')} per million output tokens.")
    shown = {r.hardware for r in lp.rows}
    for hw_id in sorted(shown - set(lp.recommended)):
        lines.append(f"- {hw_id}: no layout of {lp.devices} devices meets the SLO.")
    lines += [f"- {n}" for n in lp.notes]
    lines += ["", "Each replica runs TP; a TP group across nodes runs its two all-reduces a "
              "layer over the inter-node NIC. Comm ms/step: the collectives of one decode step."]
    if m.is_moe:
        lines.append("EP = TP x DP spreads the routed experts over every device (attention stays "
                     "TP in each replica) and adds two all-to-alls per MoE layer; without EP each "
                     "replica holds all experts, split by TP. Expert GiB/step: routed-expert "
                     "weights one device reads in a decode step, for the E (1 - (1 - k/E)^tokens) "
                     "experts the step's tokens touch (uniform routing).")
    lines.append("")
    if hold:
        lines += [f"## Devices just to hold {m.name} and the KV cache of {batch} request(s) of "
                  f"{req.input_len + req.output_len} tokens",
                  "", "| hardware | weights | weights GiB | KV GiB | devices (floor) | nodes |",
                  "|---|---|---|---|---|---|"]
        for h in hold:
            lines.append(f"| {h.hardware_name} | {h.precision} | {h.weights_gib:.0f} | "
                         f"{h.kv_gib:.1f} | {h.devices} | {h.nodes} |")
        lines += ["", "Floor: (weights + KV) / usable memory per device, spread evenly; a "
                  "layout's TP granularity, expert divisibility and activations add to it.", ""]
    return "\n".join(lines)


def render_context_parallel(model: ModelShape, input_len: int, output_len: int,
                            rows: list[ContextParallelRow],
                            fewest: dict[str, ContextParallelRow]) -> str:
    lines = [
        f"## One request of {input_len} + {output_len} tokens: context parallel",
        "",
        "| hardware | precision | TP x CP | devices | nodes | KV GiB (whole request) | "
        "weights / KV / activations GiB per device (usable) | prefill s (overlapped) | "
        "prefill s (serial) | ring transfer s | TPOT ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **fewest devices**" if fewest.get(r.hardware) is r else ""
        lines.append(
            f"| {r.hardware_name} | {r.precision} | {r.tp} x {r.cp}{mark} | {r.devices} | "
            f"{r.nodes} | {r.kv_gib_total:.1f} | {r.weights_gib_per_device:.1f} / "
            f"{r.kv_gib_per_device:.1f} / {r.activations_gib_per_device:.1f} "
            f"({r.usable_gib_per_device:.1f}) | {r.prefill_s:.1f} | {r.prefill_serial_s:.1f} | "
            f"{r.ring_transfer_s:.2f} | {r.tpot_ms:.1f} |")
    if not rows:
        lines.append("| (none) | | no TP x CP up to 1024 groups holds it | | | | | | | | |")
    lines += ["", "Ring attention with zig-zag sharding (causal work balanced over the CP ranks); "
              "each layer's KV shards circle the ring while the ranks attend to the block they "
              "hold: the 'overlapped' prefill assumes that transfer hides behind the attention, "
              "'serial' adds it. Activations: one layer over a rank's local tokens in one pass."]
    limit = model.max_position_embeddings
    if limit and input_len + output_len > limit:
        lines.append(f"Note: {input_len + output_len} tokens exceed {model.name}'s "
                     f"max_position_embeddings ({limit}); the figures assume a context-extended "
                     "variant of the same shape.")
    lines.append("")
    return "\n".join(lines)
