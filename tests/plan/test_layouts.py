"""Parallel layouts: enumeration, collectives over node and inter-node links, the recommendation,
expert parallel, and bad device counts."""

from __future__ import annotations

import pytest

from soarllm.errors import InvalidRequestError
from soarllm.plan.collectives import all_reduce_s, all_to_all_s
from soarllm.plan.hardware import load_catalog
from soarllm.plan.layouts import (
    Layout,
    devices_to_hold,
    enumerate_layouts,
    plan_layout,
    plan_layouts,
)
from soarllm.plan.model_shape import load_model_shape
from soarllm.plan.planner import PlanRequest
from soarllm.plan.roofline import Precision, Roofline

CATALOG = {h.id: h for h in load_catalog()}
H100, ASCEND, H200 = CATALOG["h100-sxm"], CATALOG["ascend-910b"], CATALOG["h200"]
LLAMA70 = load_model_shape("Llama-3-70B")
V3 = load_model_shape("DeepSeek-V3")


def test_catalog_node_sizes_and_internode_links():
    for hw in (H100, H200, ASCEND):
        assert hw.node_size == 8 and 0 < hw.internode_gbs < hw.interconnect_gbs
        assert any("inter-node" in k for k in hw.sources)


def test_enumeration_covers_every_tp_x_dp_with_tp_in_node_first():
    layouts = enumerate_layouts(LLAMA70, ASCEND, 16)
    assert [(x.tp, x.dp) for x in layouts] == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]
    assert all(x.devices == 16 for x in layouts)
    # TP must divide the 64 heads: of 12's divisors 3, 6 and 12 do not.
    assert [x.tp for x in enumerate_layouts(LLAMA70, H100, 12)] == [1, 2, 4]
    # A toy catalog entry with 4 devices a node: TP 8 spans nodes and comes after TP 1, 2, 4.
    small_node = H100.__class__(**{**H100.__dict__, "devices_per_node": 4})
    assert [x.tp for x in enumerate_layouts(LLAMA70, small_node, 8)] == [1, 2, 4, 8]


def test_all_reduce_zero_at_tp1_and_slower_across_nodes():
    p = Precision.make("bf16")
    assert Roofline(LLAMA70, ASCEND, p, tp=1).comm_s(64) == 0.0
    eff = ASCEND.efficiency
    nbytes = 64 * 8192 * 2  # a decode step of 64 tokens: hidden-size activations, bf16
    in_node = 2 * 7 / 8 * nbytes / (196e9 * eff.comm_eff) + 15e-6
    across = 2 * 15 / 16 * nbytes / (25e9 * eff.comm_eff) + 30e-6
    assert all_reduce_s(ASCEND, eff, 8, nbytes) == pytest.approx(in_node)
    assert all_reduce_s(ASCEND, eff, 16, nbytes) == pytest.approx(across)
    # Two all-reduces a layer, 80 layers.
    assert Roofline(LLAMA70, ASCEND, p, tp=8).comm_s(64) == pytest.approx(160 * in_node)
    assert Roofline(LLAMA70, ASCEND, p, tp=16).comm_s(64) == pytest.approx(160 * across)
    assert across > 5 * in_node


def test_all_to_all_splits_node_and_nic_traffic():
    eff = H100.efficiency
    nbytes = 1e6
    on = 7 / 16 * nbytes / (450e9 * eff.comm_eff)
    off = 8 / 16 * nbytes / (50e9 * eff.comm_eff)
    assert all_to_all_s(H100, eff, 16, nbytes) == pytest.approx(max(on, off) + 20e-6)
    assert all_to_all_s(H100, eff, 1, nbytes) == 0.0


def test_llama70b_on_8_h100_recommendation_meets_the_slo():
    req = PlanRequest(LLAMA70, 1024, 256, slo_ttft_ms=1000, slo_tpot_ms=50)
    lp = plan_layouts(req, [H100], 8)
    best = lp.recommended["h100-sxm"]
    assert best.meets_slo and best.devices == 8 and not best.tp_spans_nodes
    assert best.ttft_ms <= 1000 and best.tpot_ms <= 50
    # Recomputed from the roofline at the per-replica batch: the SLO holds there.
    rf = Roofline(LLAMA70, H100, Precision.make("bf16"), best.tp)
    per_replica = best.batch // best.dp
    assert rf.ttft(per_replica, 1024).time_s * 1e3 <= 1000
    assert rf.tpot(per_replica, 1024, 256).time_s * 1e3 <= 50
    # TP1 cannot hold 141 GB of bf16 weights on an 80 GB card.
    assert not next(r for r in lp.rows if r.tp == 1).fits
    assert best.tokens_per_s_per_device == max(r.tokens_per_s_per_device for r in lp.rows
                                               if r.meets_slo and not r.tp_spans_nodes)


def test_two_ascend_nodes_prefer_tp_within_a_node():
    req = PlanRequest(LLAMA70, 1024, 256, slo_ttft_ms=1000, slo_tpot_ms=50)
    lp = plan_layouts(req, [ASCEND], 16)
    best = lp.recommended["ascend-910b"]
    assert best.tp <= 8 and best.dp == 16 // best.tp
    tp16 = next(r for r in lp.rows if r.tp == 16)
    tp8 = next(r for r in lp.rows if r.tp == 8)
    assert tp16.tp_spans_nodes and tp16.comm_ms_per_decode_step > tp8.comm_ms_per_decode_step
    assert tp16.nodes == 2


def test_expert_parallel_layouts_for_deepseek_v3():
    layouts = enumerate_layouts(V3, H100, 16)
    assert {x.ep for x in layouts} == {1, 16}
    assert all(x.ep in (1, x.devices) for x in layouts)
    req = PlanRequest(V3, 1024, 256, slo_ttft_ms=2000, slo_tpot_ms=100, quant="fp8")
    row = plan_layout(req, H100, Layout(tp=1, dp=16, ep=16))
    # Per device: the non-expert weights whole (fp8 projections, bf16 tables and norms) and
    # 256 / 16 = 16 experts of each of the 58 MoE layers.
    fp8 = 1 + 4 / 128**2
    weights = (V3.non_expert_linear_params * fp8 + (V3.table_params + V3.norm_params) * 2
               + 58 * 16 * 3 * 7168 * 2048 * fp8)
    assert row.weights_gib_per_device == pytest.approx(weights / 2**30)
    assert row.fits and row.comm_ms_per_decode_step > 0  # all-to-all at TP=1
    # Without EP a replica of TP 8 holds all 671B parameters / 8: no room on 80 GB.
    assert not plan_layout(req, H100, Layout(tp=8, dp=2)).fits


def test_devices_to_hold_by_hand():
    rows = {r.precision: r for r in devices_to_hold(V3, H200, batch=32, input_len=4096,
                                                    output_len=1024)}
    usable = 141 * 2**30 * 0.9
    kv = 61 * 576 * 2 * 5120 * 32
    bf16 = V3.num_params * 2
    assert rows["bf16"].devices == -(-(bf16 + kv) // usable)  # 1342 GB + 14 GB: 10 H200s
    assert rows["bf16"].devices == 10 and rows["bf16"].nodes == 2
    assert rows["fp8"].devices < rows["bf16"].devices and rows["int4"].devices <= rows["fp8"].devices


def test_bad_device_counts_and_expert_counts():
    req = PlanRequest(LLAMA70, 1024, 256, 1000, 50)
    with pytest.raises(InvalidRequestError, match="at least 1"):
        plan_layouts(req, [H100], 0)
    # 3 devices: only TP 1 divides both 3 and 64 heads, too small for 141 GB of weights.
    with pytest.raises(InvalidRequestError, match=r"not a multiple of a usable TP.*--devices 4"):
        plan_layouts(req, [H100], 3)
    with pytest.raises(InvalidRequestError, match=r"256 routed experts.*--devices 16 or 32"):
        enumerate_layouts(V3, H100, 24, expert_parallel="on")
    with pytest.raises(InvalidRequestError, match="no experts"):
        enumerate_layouts(LLAMA70, H100, 8, expert_parallel="on")
    with pytest.raises(InvalidRequestError, match="expert parallel mode"):
        enumerate_layouts(V3, H100, 16, expert_parallel="maybe")
    # In auto mode 24 devices simply get no EP layout.
    assert {x.ep for x in enumerate_layouts(V3, H100, 24)} == {1}
