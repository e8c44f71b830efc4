"""For each hardware and tensor-parallel degree: memory fit, the largest batch meeting the SLO,
tokens/s per device, cost per million output tokens; and the quadrant with a recommendation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from soarllm.plan.hardware import Hardware
from soarllm.plan.model_shape import ModelShape
from soarllm.plan.roofline import Precision, Roofline

LARGE_MODEL_GIB = 40.0  # weights above this do not fit one 48 GB card with room for a KV cache
STRICT_TPOT_MS = 50.0  # faster than ~20 tokens/s per user: interactive chat, code completion
STRICT_TTFT_MS = 300.0
MAX_BATCH = 4096


@dataclass(frozen=True)
class PlanRequest:
    model: ModelShape
    input_len: int
    output_len: int
    slo_ttft_ms: float
    slo_tpot_ms: float
    quant: str | None = None
    kv_dtype: str | None = None
    dtype: str | None = None  # None: each hardware's default compute dtype


@dataclass
class PlanRow:
    hardware: str
    hardware_name: str
    tp: int
    precision: str
    weights_gib_per_device: float
    kv_mib_per_sequence: float
    max_batch_by_memory: int
    fits: bool
    batch: int  # largest batch meeting both SLOs (0: not even one request meets them)
    ttft_ms: float  # at ``batch`` (at batch 1 when batch is 0)
    tpot_ms: float
    decode_bound: str
    output_tokens_per_s: float  # whole TP group
    tokens_per_s_per_device: float
    cost_per_m_tokens: float | None  # USD per million output tokens
    meets_slo: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tp_degrees(model: ModelShape, hw: Hardware) -> list[int]:
    degrees, t = [], 1
    while t <= hw.max_tp:
        if model.num_heads % t == 0:
            degrees.append(t)
        t *= 2
    return degrees


def largest_batch(ok, upper: int) -> int:
    """The largest b in [1, upper] with ok(b), for ok monotone (true then false); 0 if none."""
    if upper < 1 or not ok(1):
        return 0
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def group_throughput(rf: Roofline, batch: int, input_len: int, output_len: int) -> float:
    """Output tokens/s of a TP group running ``batch`` requests: each takes TTFT + (o - 1) TPOT."""
    ttft = rf.ttft(batch, input_len).time_s
    tpot = rf.tpot(batch, input_len, output_len).time_s
    return batch * output_len / (ttft + (output_len - 1) * tpot)


def plan_one(req: PlanRequest, hw: Hardware, tp: int) -> PlanRow:
    precision = Precision.make(req.dtype or hw.default_dtype, req.quant, req.kv_dtype)
    rf = Roofline(req.model, hw, precision, tp)
    mem_batch = min(rf.max_batch_by_memory(req.input_len, req.output_len), MAX_BATCH)

    def ok(b: int) -> bool:
        return (rf.ttft(b, req.input_len).time_s * 1e3 <= req.slo_ttft_ms
                and rf.tpot(b, req.input_len, req.output_len).time_s * 1e3 <= req.slo_tpot_ms)

    batch = largest_batch(ok, mem_batch)
    at = max(batch, 1)
    tpot = rf.tpot(at, req.input_len, req.output_len)
    throughput = group_throughput(rf, at, req.input_len, req.output_len) if batch else 0.0
    cost = None
    if hw.price_per_hour and throughput > 0:
        cost = hw.price_per_hour * tp / 3600 / throughput * 1e6
    return PlanRow(
        hardware=hw.id,
        hardware_name=hw.name,
        tp=tp,
        precision=precision.label,
        weights_gib_per_device=rf.weight_bytes() / 2**30,
        kv_mib_per_sequence=rf.kv_bytes_per_sequence(req.input_len, req.output_len) / 2**20,
        max_batch_by_memory=mem_batch,
        fits=mem_batch >= 1,
        batch=batch,
        ttft_ms=rf.ttft(at, req.input_len).time_s * 1e3,
        tpot_ms=tpot.time_s * 1e3,
        decode_bound=tpot.bound,
        output_tokens_per_s=throughput,
        tokens_per_s_per_device=throughput / tp,
        cost_per_m_tokens=cost,
        meets_slo=batch >= 1,
    )


def plan(req: PlanRequest, hardware: list[Hardware]) -> list[PlanRow]:
    return [plan_one(req, hw, tp) for hw in hardware for tp in tp_degrees(req.model, hw)]


@dataclass
class Quadrant:
    size: str  # "small" | "large"
    latency: str  # "strict" | "relaxed"
    advice: str
    best_cost: PlanRow | None
    best_latency: PlanRow | None


_ADVICE = {
    ("small", "strict"): "latency-bound: decode reads the weights every step, so memory "
    "bandwidth per device decides TPOT; use one device (TP=1, or TP=2 to cut TPOT further) "
    "with the most GB/s per dollar, and keep batches moderate.",
    ("small", "relaxed"): "throughput-bound: the cheapest tokens win; batch as large as memory "
    "allows on a cost-efficient card and quantize (w4a16 / w8a8) to free memory for the KV cache.",
    ("large", "strict"): "needs tensor parallel over a fast interconnect (NVLink, HCCS) so each "
    "device reads a slice of the weights per step; PCIe-only cards lose most of the gain.",
    ("large", "relaxed"): "memory-capacity-bound: use high-memory devices and quantized weights "
    "to fit the model on fewer devices, then fill the rest with KV cache for large batches.",
}


def quadrant(req: PlanRequest, rows: list[PlanRow]) -> Quadrant:
    weights_gib = min((r.weights_gib_per_device * r.tp for r in rows), default=0.0)
    size = "large" if weights_gib > LARGE_MODEL_GIB else "small"
    strict = req.slo_tpot_ms <= STRICT_TPOT_MS or req.slo_ttft_ms <= STRICT_TTFT_MS
    latency = "strict" if strict else "relaxed"
    feasible = [r for r in rows if r.meets_slo]
    priced = [r for r in feasible if r.cost_per_m_tokens is not None]
    best_cost = min(priced, key=lambda r: r.cost_per_m_tokens) if priced else None
    best_latency = min(feasible, key=lambda r: r.tpot_ms) if feasible else None
    return Quadrant(size, latency, _ADVICE[(size, latency)], best_cost, best_latency)
