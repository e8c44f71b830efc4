from __future__ import annotations

import json

import pytest

from soarllm.plan.hardware import load_catalog
from soarllm.plan.model_shape import ModelShape, load_model_shape
from soarllm.plan.planner import (
    PlanRequest,
    group_throughput,
    largest_batch,
    plan,
    plan_one,
    quadrant,
    tp_degrees,
)
from soarllm.plan.roofline import Roofline
from tests.plan.test_roofline import FP32, HW, MODEL


def test_largest_batch_binary_search():
    assert largest_batch(lambda b: b <= 37, 100) == 37
    assert largest_batch(lambda b: True, 12) == 12
    assert largest_batch(lambda b: False, 12) == 0
    assert largest_batch(lambda b: True, 0) == 0


def test_plan_row_by_hand():
    # Toy model and hardware of test_roofline: 1000 FLOP/s, 1000 B/s, efficiency 1, overlapped,
    # no overheads, $3.6 an hour. Memory allows (10000 - 1392) // 160 = 53 sequences of 3 + 2
    # tokens, and the SLOs are unlimited, so the batch is 53.
    req = PlanRequest(MODEL, input_len=3, output_len=2, slo_ttft_ms=1e9, slo_tpot_ms=1e9)
    row = plan_one(req, HW, tp=1)
    assert row.max_batch_by_memory == 53 and row.batch == 53  # memory is the only limit
    b, linear, q_dim, layers, hidden, vocab, kv_per_token = 53, 144, 4, 2, 4, 10, 32
    weights = layers * linear * 4 + vocab * hidden * 4  # projections + LM head, fp32: 1312 B
    # Prefill: 3 new tokens a prompt, 3 * 4 / 2 = 6 causal query-key pairs, one logit row each.
    ttft_flops = (2 * b * 3 * linear * layers + 4 * q_dim * b * 6 * layers
                  + 2 * b * hidden * vocab)  # 106000
    ttft_bytes = weights + kv_per_token * b * 3  # 6400
    ttft = max(ttft_flops / 1000, ttft_bytes / 1000)  # compute-bound: 106 s
    # Decode at mid-output context 3 + 2 // 2 = 4: 1 new token, 4 pairs, 4 KV reads + 1 write.
    tpot_flops = (2 * b * linear * layers + 4 * q_dim * b * 4 * layers
                  + 2 * b * hidden * vocab)  # 41552
    tpot_bytes = weights + kv_per_token * b * (4 + 1)  # 9792
    tpot = max(tpot_flops / 1000, tpot_bytes / 1000)  # compute-bound: 41.552 s
    assert (ttft, tpot) == pytest.approx((106.0, 41.552))
    # Each request: TTFT, then output_len - 1 = 1 decode step; 53 * 2 tokens in 147.552 s.
    throughput = b * 2 / (ttft + 1 * tpot)
    assert row.output_tokens_per_s == pytest.approx(throughput)
    assert row.tokens_per_s_per_device == pytest.approx(throughput)
    assert row.ttft_ms == pytest.approx(ttft * 1e3) and row.tpot_ms == pytest.approx(tpot * 1e3)
    assert row.decode_bound == "compute"
    # $3.6 / h = $0.001 / s for one device: cost per million tokens = 0.001 / throughput * 1e6.
    assert row.cost_per_m_tokens == pytest.approx(0.001 / throughput * 1e6)
    assert row.cost_per_m_tokens == pytest.approx(147.552 / 106 * 1000)
    assert group_throughput(Roofline(MODEL, HW, FP32), 53, 3, 2) == pytest.approx(throughput)


def test_slo_limits_the_batch():
    rf = Roofline(MODEL, HW, FP32)
    limit_ms = 10_000
    expected = max(b for b in range(1, 54) if rf.ttft(b, 3).time_s * 1e3 <= limit_ms)
    req = PlanRequest(MODEL, 3, 2, slo_ttft_ms=limit_ms, slo_tpot_ms=1e9)
    assert plan_one(req, HW, 1).batch == expected
    # FLOPs of a prefill of b prompts: b * (2*3*144*2 + 4*4*6*2 + 2*4*10) = 2000 b -> b <= 5.
    assert expected == 5
    impossible = PlanRequest(MODEL, 3, 2, slo_ttft_ms=1, slo_tpot_ms=1)
    row = plan_one(impossible, HW, 1)
    assert row.batch == 0 and not row.meets_slo and row.cost_per_m_tokens is None


def test_tp_degrees_divide_heads():
    assert tp_degrees(MODEL, HW) == [1, 2]
    odd = ModelShape("odd", 576, 30, 9, 3, 64, 1536, 49152)
    h100 = next(h for h in load_catalog() if h.id == "h100-sxm")
    assert tp_degrees(odd, h100) == [1]


def test_catalog_has_sources_and_prices():
    catalog = load_catalog()
    ids = {h.id for h in catalog}
    assert {"h100-sxm", "h200", "a100-80gb", "l40s", "rtx-4090", "ascend-910b",
            "atlas-300i-duo"} <= ids
    for hw in catalog:
        assert hw.sources and hw.price_per_hour and hw.memory_bw_gbs > 0 and hw.tflops


def test_known_model_shapes_match_published_sizes():
    assert load_model_shape("Llama-3-8B").num_params == pytest.approx(8.03e9, rel=0.002)
    assert load_model_shape("Llama-3-70B").num_params == pytest.approx(70.55e9, rel=0.002)
    assert load_model_shape("Qwen2.5-7B").num_params == pytest.approx(7.62e9, rel=0.003)
    assert load_model_shape("smollm2-135m-instruct").num_params == pytest.approx(134.5e6, rel=0.002)


def test_shape_from_config_file(tmp_path):
    cfg = {"text_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": 128, "vocab_size": 100, "head_dim": 32}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    shape = load_model_shape(str(tmp_path))
    assert (shape.num_kv_heads, shape.head_dim) == (4, 32)
    assert load_model_shape(str(path)).hidden_size == 64


def test_quadrants():
    catalog = load_catalog()
    big = load_model_shape("Llama-3-70B")
    strict = PlanRequest(big, 1024, 256, slo_ttft_ms=2000, slo_tpot_ms=30)
    q = quadrant(strict, plan(strict, catalog))
    assert (q.size, q.latency) == ("large", "strict")
    assert q.best_latency is not None and q.best_latency.tp >= 4
    small = PlanRequest(load_model_shape("Llama-3-8B"), 512, 256, 5000, 200, quant="w4a16")
    q = quadrant(small, plan(small, catalog))
    assert (q.size, q.latency) == ("small", "relaxed") and q.best_cost is not None
