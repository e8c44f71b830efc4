"""One very long request: its KV cache, and context parallel (CP) to hold and prefill it.

``cp`` groups of ``tp`` devices each hold 1/cp of the sequence's tokens and their KV cache
(TP inside a node, split by heads; MLA's latent is whole on every TP rank). A dense model's
weights are replicated per CP group (split by TP); a MoE model's routed experts are spread over
all tp x cp devices (EP; their count must divide the experts), its attention and shared
weights per CP group.

Per device the request needs weights + KV of its ceil((input + output) / cp) tokens + the
activations of one layer over its local tokens, which ring attention processes in one pass:
residual and normed hidden states (2 h), the Q/K/V (or MLA's expanded) projections and two MLP
intermediates, split by TP.

Prefill under ring attention, with the causal work balanced over the ranks (zig-zag sharding):
projections 2 (S / cp) P_act / t FLOPs, attention S (S + 1) / 2 f_pair L / (t cp); in each
layer every rank passes its KV shard round the ring, cp - 1 hops of S / cp tokens over the node
link (or the NIC once tp x cp spans nodes). **Assumption: the KV block transfer is overlapped
with the attention on the block already received** (``prefill_s`` = projections +
max(attention, transfer) per layer); ``prefill_serial_s`` is the same without overlap. Decode:
each rank attends over its shard, then one small all-reduce a layer merges the partial outputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from soarllm.errors import InvalidRequestError
from soarllm.plan.collectives import all_reduce_s, spans_nodes
from soarllm.plan.hardware import Hardware
from soarllm.plan.model_shape import ModelShape
from soarllm.plan.roofline import Precision, Roofline

MAX_CP = 1024


def activation_bytes_per_token(model: ModelShape, tp: int, act_bytes: float) -> float:
    """One layer's working set per token in a prefill, on one device of a TP group."""
    m = model
    if m.is_mla:
        attn = (m.num_heads * (2 * m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) / tp
                + m.kv_lora_rank + m.qk_rope_head_dim)
    else:
        attn = (m.num_heads + 2 * m.num_kv_heads) * m.head_dim / tp
    mlp = m.intermediate_size if m.num_dense_layers or not m.is_moe else 0
    if m.is_moe:
        mlp = max(mlp, m.experts_per_token * m.moe_intermediate_size)
    return (2 * m.hidden_size + attn + 2 * mlp / tp) * act_bytes


@dataclass
class ContextParallelRow:
    hardware: str
    hardware_name: str
    precision: str
    tp: int
    cp: int
    devices: int
    nodes: int
    tokens_per_rank: int
    kv_gib_total: float  # the whole request's KV cache, one copy
    weights_gib_per_device: float
    kv_gib_per_device: float
    activations_gib_per_device: float
    usable_gib_per_device: float
    prefill_s: float  # ring transfer overlapped with attention
    prefill_serial_s: float  # not overlapped
    ring_transfer_s: float
    tpot_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _memory(model: ModelShape, hw: Hardware, precision: Precision, tp: int, cp: int,
            tokens: int) -> tuple[float, float, float]:
    local = math.ceil(tokens / cp)
    weights = Roofline(model, hw, precision, tp, ep=tp * cp).weight_bytes()
    kv = model.kv_bytes_per_token(precision.kv_bytes, tp) * local
    act = activation_bytes_per_token(model, tp, precision.act_bytes) * local
    return weights, kv, act


def context_parallel_row(model: ModelShape, hw: Hardware, precision: Precision, tp: int, cp: int,
                         input_len: int, output_len: int) -> ContextParallelRow:
    m, eff = model, hw.efficiency
    tokens = input_len + output_len
    weights, kv, act = _memory(m, hw, precision, tp, cp, tokens)
    local = math.ceil(input_len / cp)
    rf = Roofline(m, hw, precision, tp, ep=tp * cp)
    peak = hw.peak_flops(precision.compute_dtype) * eff.compute_eff
    bw = hw.memory_bw_gbs * 1e9 * eff.memory_eff
    # prefill
    proj_s = max(2 * local * m.active_linear_params / tp / peak, weights / bw)
    pairs = input_len * (input_len + 1) / 2
    attn_s = pairs * m.attention_flops_per_pair() * m.num_layers / (tp * cp) / peak
    ring_s = 0.0
    if cp > 1:
        link_bw, latency = ((hw.internode_gbs, hw.internode_latency_us)
                            if spans_nodes(hw, tp * cp)
                            else (hw.interconnect_gbs, hw.interconnect_latency_us))
        if link_bw <= 0:
            raise InvalidRequestError(f"{hw.name} has no link between context-parallel ranks "
                                      "in the catalog: use --devices within one node")
        shard = local * m.kv_elements_per_token_layer(tp) * precision.kv_bytes
        per_layer = (cp - 1) * (shard / (link_bw * 1e9 * eff.comm_eff) + latency * 1e-6)
        ring_s = m.num_layers * per_layer
    comm_s = rf.comm_s(local) + eff.step_overhead_s
    prefill = proj_s + max(attn_s, ring_s) + comm_s
    serial = proj_s + attn_s + ring_s + comm_s
    # decode at the full context
    ctx = math.ceil(tokens / cp)
    flops = (2 * m.active_linear_params + ctx * m.attention_flops_per_pair(decode=True)
             * m.num_layers + 2 * m.hidden_size * m.vocab_size) / tp
    expert_bytes = (m.num_moe_layers * m.experts_per_token * m.expert_params
                    * precision.weight_bytes / (tp * cp))
    nbytes = ((m.non_expert_linear_params * precision.weight_bytes
               + m.lm_head_params * precision.act_bytes) / tp + expert_bytes + kv)
    merge = m.num_heads / tp * (m.v_head_dim or m.head_dim) * 4  # fp32 partial outputs
    tpot = (max(flops / peak, nbytes / bw) + rf.comm_s(1)
            + m.num_layers * all_reduce_s(hw, eff, cp, merge) + eff.step_overhead_s)
    n = tp * cp
    return ContextParallelRow(
        hardware=hw.id, hardware_name=hw.name, precision=precision.label, tp=tp, cp=cp,
        devices=n, nodes=-(-n // hw.node_size), tokens_per_rank=ctx,
        kv_gib_total=m.kv_bytes_per_token(precision.kv_bytes) * tokens / 2**30,
        weights_gib_per_device=weights / 2**30, kv_gib_per_device=kv / 2**30,
        activations_gib_per_device=act / 2**30,
        usable_gib_per_device=hw.usable_memory_bytes / 2**30,
        prefill_s=prefill, prefill_serial_s=serial, ring_transfer_s=ring_s, tpot_ms=tpot * 1e3,
    )


def smallest_cp(model: ModelShape, hw: Hardware, precision: Precision, tp: int,
                tokens: int) -> int | None:
    """The fewest CP groups of ``tp`` devices that hold one request of ``tokens`` tokens (for a
    MoE model, with the experts divisible over the tp x cp devices)."""
    for cp in range(1, MAX_CP + 1):
        if model.is_moe and model.num_experts % (tp * cp):
            continue
        if sum(_memory(model, hw, precision, tp, cp, tokens)) <= hw.usable_memory_bytes:
            return cp
    return None


def plan_context_parallel(model: ModelShape, hw: Hardware, precision: Precision, input_len: int,
                          output_len: int) -> list[ContextParallelRow]:
    """For each TP degree inside a node, the fewest CP groups holding the request."""
    if input_len < 1 or output_len < 0:
        raise InvalidRequestError("--input-len must be at least 1 and --output-len at least 0")
    tps = [t for t in range(1, hw.node_size + 1) if model.num_heads % t == 0
           and hw.node_size % t == 0]
    rows = []
    for tp in tps:
        cp = smallest_cp(model, hw, precision, tp, input_len + output_len)
        if cp is not None:
            rows.append(context_parallel_row(model, hw, precision, tp, cp, input_len,
                                             output_len))
    return rows


def fewest_devices(rows: list[ContextParallelRow]) -> ContextParallelRow | None:
    return min(rows, key=lambda r: (r.devices, r.prefill_s), default=None)
