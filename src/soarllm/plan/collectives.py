"""Time of the collectives a parallel layout adds to a step, over the hardware's two links.

A group of up to ``devices_per_node`` devices talks over the node's interconnect (NVLink, HCCS);
a larger group spans nodes, and a ring over it is as slow as its slowest hop, the inter-node NIC.
Groups are packed into as few nodes as possible.
"""

from __future__ import annotations

from soarllm.errors import InvalidRequestError
from soarllm.plan.hardware import Efficiency, Hardware


def spans_nodes(hw: Hardware, group: int) -> bool:
    return group > hw.node_size


def _intra(hw: Hardware) -> tuple[float, float]:
    if hw.interconnect_gbs <= 0:
        raise InvalidRequestError(f"{hw.name} has no interconnect for tensor or expert parallel: "
                                  "use one device per replica (TP=1, no EP)")
    return hw.interconnect_gbs * 1e9, hw.interconnect_latency_us * 1e-6


def _inter(hw: Hardware) -> tuple[float, float]:
    if hw.internode_gbs <= 0:
        raise InvalidRequestError(
            f"{hw.name} has no inter-node bandwidth in the catalog (internode_gbs): keep the "
            f"group within {hw.node_size} devices or add internode_gbs to the catalog entry")
    return hw.internode_gbs * 1e9, hw.internode_latency_us * 1e-6


def all_reduce_s(hw: Hardware, eff: Efficiency, group: int, nbytes: float) -> float:
    """Ring all-reduce of ``nbytes`` per device: each device sends 2 (g - 1) / g of it, over the
    node's link, or the inter-node link once the ring leaves the node; plus one latency."""
    if group <= 1:
        return 0.0
    bw, latency = _inter(hw) if spans_nodes(hw, group) else _intra(hw)
    return 2 * (group - 1) / group * nbytes / (bw * eff.comm_eff) + latency


def all_to_all_s(hw: Hardware, eff: Efficiency, group: int, nbytes: float) -> float:
    """All-to-all in which each device scatters ``nbytes`` evenly over the group: the share for
    devices of its own node goes over the node's link, the rest over its inter-node link, at the
    same time; plus the latency of the slower link."""
    if group <= 1:
        return 0.0
    bw, latency = _intra(hw)
    on_node = min(group, hw.node_size)
    time = (on_node - 1) / group * nbytes / (bw * eff.comm_eff)
    if spans_nodes(hw, group):
        bw_x, latency = _inter(hw)
        time = max(time, (group - on_node) / group * nbytes / (bw_x * eff.comm_eff))
    return time + latency
