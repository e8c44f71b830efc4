"""Parallel layouts for a device budget: TP x DP (x EP over the MoE layers) = N devices.

A layout runs ``dp`` replicas of ``tp`` devices each. Tensor parallel splits attention (and
dense MLPs) by heads inside a replica; its two all-reduces a layer run over the node's link, or
over the inter-node NIC once the group is larger than a node (``collectives``). For a MoE model
the routed experts either stay split with TP inside every replica (EP=1) or are spread over all
N devices (EP = TP x DP, attention still TP inside each replica, DP across them), which adds an
all-to-all dispatch and combine per MoE layer. Pipeline parallel is not modelled.

The recommendation is, per hardware, the layout with the most output tokens/s per device (the
lowest $/M tokens) among those meeting the SLO, preferring TP within a node: a TP group across
nodes puts two all-reduces a layer on a NIC an order of magnitude slower than NVLink or HCCS,
and is chosen only when nothing inside a node meets the SLO.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from soarllm.errors import InvalidRequestError
from soarllm.plan.collectives import spans_nodes
from soarllm.plan.hardware import Hardware
from soarllm.plan.model_shape import ModelShape
from soarllm.plan.planner import MAX_BATCH, PlanRequest, group_throughput, largest_batch
from soarllm.plan.roofline import Precision, Roofline

EXPERT_PARALLEL = ("auto", "on", "off")


@dataclass(frozen=True)
class Layout:
    tp: int
    dp: int
    ep: int = 1  # 1: experts split with TP in each replica; tp * dp: spread over every device

    @property
    def devices(self) -> int:
        return self.tp * self.dp

    @property
    def label(self) -> str:
        return f"TP{self.tp} x DP{self.dp}" + (f", EP{self.ep}" if self.ep > 1 else "")


def _check_devices(devices: int) -> None:
    if devices < 1:
        raise InvalidRequestError(f"--devices must be at least 1 (got {devices})")


def _check_expert_parallel(model: ModelShape, devices: int, expert_parallel: str) -> None:
    if expert_parallel not in EXPERT_PARALLEL:
        raise InvalidRequestError(
            f"unknown expert parallel mode {expert_parallel!r}; use {', '.join(EXPERT_PARALLEL)}")
    if expert_parallel != "on":
        return
    if not model.is_moe:
        raise InvalidRequestError(f"{model.name} has no experts: drop --ep on")
    e = model.num_experts
    if e % devices:
        below = max(d for d in range(1, devices + 1) if e % d == 0)
        above = min((d for d in range(devices, e + 1) if e % d == 0), default=e)
        raise InvalidRequestError(
            f"{model.name} has {e} routed experts, not divisible by EP={devices}: pass "
            f"--devices {below} or {above} (a divisor of {e}), or --ep off")


def enumerate_layouts(model: ModelShape, hw: Hardware, devices: int,
                      expert_parallel: str = "auto") -> list[Layout]:
    """Every TP x DP = ``devices`` with TP dividing the attention heads, TP within a node first;
    for a MoE model each also with EP over all devices where the expert count allows."""
    _check_devices(devices)
    _check_expert_parallel(model, devices, expert_parallel)
    tps = [t for t in range(1, devices + 1) if devices % t == 0 and model.num_heads % t == 0]
    tps.sort(key=lambda t: (spans_nodes(hw, t), t))
    ep_ok = model.is_moe and devices > 1 and model.num_experts % devices == 0
    out = []
    for t in tps:
        if expert_parallel != "on" or devices == 1:
            out.append(Layout(t, devices // t))
        if ep_ok and expert_parallel != "off" and devices > t:
            out.append(Layout(t, devices // t, ep=devices))
    return out


@dataclass
class LayoutRow:
    hardware: str
    hardware_name: str
    layout: str
    tp: int
    dp: int
    ep: int
    devices: int
    nodes: int
    tp_spans_nodes: bool
    precision: str
    weights_gib_per_device: float
    kv_mib_per_sequence: float  # on one device
    max_batch_by_memory: int  # all replicas together
    fits: bool
    batch: int  # all replicas together, largest meeting both SLOs (0: none)
    ttft_ms: float
    tpot_ms: float
    comm_ms_per_decode_step: float
    expert_gib_per_decode_step: float  # routed-expert weights one device reads a decode step
    output_tokens_per_s: float  # all replicas together
    tokens_per_s_per_device: float
    cost_per_m_tokens: float | None
    meets_slo: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_layout(req: PlanRequest, hw: Hardware, layout: Layout) -> LayoutRow:
    precision = Precision.make(req.dtype or hw.default_dtype, req.quant, req.kv_dtype)
    rf = Roofline(req.model, hw, precision, layout.tp, ep=layout.ep)
    per_replica = min(rf.max_batch_by_memory(req.input_len, req.output_len), MAX_BATCH)

    def ok(b: int) -> bool:
        return (rf.ttft(b, req.input_len).time_s * 1e3 <= req.slo_ttft_ms
                and rf.tpot(b, req.input_len, req.output_len).time_s * 1e3 <= req.slo_tpot_ms)

    batch = largest_batch(ok, per_replica) if per_replica else 0
    at = max(batch, 1)
    tpot = rf.tpot(at, req.input_len, req.output_len)
    throughput = layout.dp * group_throughput(rf, at, req.input_len, req.output_len) if batch else 0.0
    cost = None
    if hw.price_per_hour and throughput > 0:
        cost = hw.price_per_hour * layout.devices / 3600 / throughput * 1e6
    return LayoutRow(
        hardware=hw.id, hardware_name=hw.name, layout=layout.label, tp=layout.tp, dp=layout.dp,
        ep=layout.ep, devices=layout.devices, nodes=-(-layout.devices // hw.node_size),
        tp_spans_nodes=spans_nodes(hw, layout.tp), precision=precision.label,
        weights_gib_per_device=rf.weight_bytes() / 2**30,
        kv_mib_per_sequence=rf.kv_bytes_per_sequence(req.input_len, req.output_len) / 2**20,
        max_batch_by_memory=per_replica * layout.dp, fits=per_replica >= 1,
        batch=batch * layout.dp,
        ttft_ms=rf.ttft(at, req.input_len).time_s * 1e3, tpot_ms=tpot.time_s * 1e3,
        comm_ms_per_decode_step=tpot.comm_s * 1e3,
        expert_gib_per_decode_step=rf.expert_bytes_read(at) / 2**30,
        output_tokens_per_s=throughput, tokens_per_s_per_device=throughput / layout.devices,
        cost_per_m_tokens=cost, meets_slo=batch >= 1,
    )


def _fits(req: PlanRequest, hw: Hardware, layout: Layout) -> bool:
    precision = Precision.make(req.dtype or hw.default_dtype, req.quant, req.kv_dtype)
    rf = Roofline(req.model, hw, precision, layout.tp, ep=layout.ep)
    return rf.max_batch_by_memory(req.input_len, req.output_len) >= 1


def smallest_fitting_devices(req: PlanRequest, hw: Hardware, start: int,
                             expert_parallel: str = "auto", limit: int = 4096) -> Layout | None:
    """The first device count from ``start`` up with a layout that holds one request."""
    for n in range(max(start, 1), limit + 1):
        mode = expert_parallel
        if mode == "on" and req.model.num_experts % n:
            continue
        for layout in enumerate_layouts(req.model, hw, n, mode):
            if _fits(req, hw, layout):
                return layout
    return None


@dataclass
class LayoutPlan:
    devices: int
    rows: list[LayoutRow]
    recommended: dict[str, LayoutRow]  # hardware id -> best layout meeting the SLO
    notes: list[str]


def recommend(rows: list[LayoutRow]) -> LayoutRow | None:
    feasible = [r for r in rows if r.meets_slo]
    if not feasible:
        return None
    return min(feasible, key=lambda r: (r.tp_spans_nodes, -r.tokens_per_s_per_device))


def plan_layouts(req: PlanRequest, hardware: list[Hardware], devices: int,
                 expert_parallel: str = "auto", raise_if_none: bool = True) -> LayoutPlan:
    """Every layout of ``devices`` devices on each hardware. A hardware on which no layout holds
    even one request gets a note naming the fix; when that is every hardware, it is an error
    (unless ``raise_if_none`` is off: the caller sizes context parallel instead)."""
    rows: list[LayoutRow] = []
    recommended: dict[str, LayoutRow] = {}
    notes: list[str] = []
    for hw in hardware:
        layouts = enumerate_layouts(req.model, hw, devices, expert_parallel)
        hw_rows = [plan_layout(req, hw, lay) for lay in layouts]
        rows += hw_rows
        if not any(r.fits for r in hw_rows):
            notes.append(_no_fit_note(req, hw, devices, expert_parallel))
        best = recommend(hw_rows)
        if best:
            recommended[hw.id] = best
    if raise_if_none and hardware and not any(r.fits for r in rows):
        raise InvalidRequestError(" ".join(notes))
    return LayoutPlan(devices, rows, recommended, notes)


def _no_fit_note(req: PlanRequest, hw: Hardware, devices: int, expert_parallel: str) -> str:
    m = req.model
    tps = [t for t in range(1, devices + 1) if devices % t == 0 and m.num_heads % t == 0]
    what = f"{m.name} ({req.input_len} + {req.output_len} tokens)"
    short = replace(req, input_len=1, output_len=0)
    layouts = enumerate_layouts(m, hw, devices, expert_parallel)
    if any(_fits(short, hw, lay) for lay in layouts):
        return (f"{what} fits no layout of {devices} x {hw.name}: the weights fit, one "
                f"request's KV cache does not; split it with context parallel "
                f"(--context-parallel), use --kv-dtype fp8 or shorten the request.")
    hint = smallest_fitting_devices(req, hw, devices + 1, expert_parallel)
    fix = (f"pass --devices {hint.devices} ({hint.label} holds it)" if hint
           else "quantize (--quant) or pick a larger device")
    if m.is_moe and expert_parallel != "off" and m.num_experts % devices:
        fix += f"; EP over all devices needs a divisor of the {m.num_experts} experts"
    return (f"{what} does not fit {devices} x {hw.name} in any layout: --devices {devices} is not "
            f"a multiple of a usable TP (it allows TP {', '.join(map(str, tps))}, too small to "
            f"hold the weights and one request's KV cache); {fix}.")


@dataclass
class HoldRow:
    hardware: str
    hardware_name: str
    precision: str
    weights_gib: float
    kv_gib: float  # the requested batch's KV cache
    devices: int  # ceil((weights + KV) / usable memory per device): a lower bound
    nodes: int


HOLD_PRECISIONS = {"bf16": None, "fp8": "fp8", "int4": "w4a16"}


def devices_to_hold(model: ModelShape, hw: Hardware, batch: int, input_len: int, output_len: int,
                    kv_dtype: str | None = None) -> list[HoldRow]:
    """Devices needed just to hold the weights at bf16 / fp8 / int4 and the KV cache of ``batch``
    requests, spread evenly (the floor of any layout; TP beyond the KV heads, MLA under TP and
    the activations only add to it)."""
    if batch < 0:
        raise InvalidRequestError(f"--batch must be at least 0 (got {batch})")
    out = []
    for label, quant in HOLD_PRECISIONS.items():
        precision = Precision.make("bf16", quant, kv_dtype)
        weights = Roofline(model, hw, precision).weight_bytes()
        kv = model.kv_bytes_per_token(precision.kv_bytes) * (input_len + output_len) * batch
        n = max(1, math.ceil((weights + kv) / hw.usable_memory_bytes))
        out.append(HoldRow(hw.id, hw.name, label, weights / 2**30, kv / 2**30, n,
                           -(-n // hw.node_size)))
    return out
