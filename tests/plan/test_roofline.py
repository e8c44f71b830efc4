"""Planner arithmetic against hand-computed cases on a toy model and toy hardware.

Toy model: 2 layers, hidden 4, 2 heads of dim 2, 1 KV head, MLP 8, vocab 10, tied embeddings.
Projections per layer: 4*4 (Q) + 2*4*2 (K, V) + 4*4 (O) + 3*4*8 (MLP) = 144 parameters.
Toy hardware: 1000 FLOP/s, 1000 B/s, 10000 bytes of memory, no overheads, efficiency 1.
"""

from __future__ import annotations

import math

import pytest

from soarllm.errors import InvalidRequestError
from soarllm.plan.hardware import Efficiency, Hardware
from soarllm.plan.model_shape import ModelShape
from soarllm.plan.roofline import Precision, Roofline

MODEL = ModelShape("toy", hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2,
                   intermediate_size=8, vocab_size=10, tie_word_embeddings=True)
EXACT = Efficiency(compute_eff=1.0, memory_eff=1.0, comm_eff=1.0, step_overhead_s=0.0,
                   seq_overhead_s=0.0, overlap=True)
HW = Hardware("toy", "toy", memory_gib=10000 / 2**30, memory_bw_gbs=1e-6,
              tflops={"fp32": 1e-9}, interconnect_gbs=1e-6, interconnect_latency_us=0.0,
              max_tp=2, price_per_hour=3.6, efficiency=EXACT, memory_reserve_fraction=0.0,
              default_dtype="fp32")
FP32 = Precision.make("fp32")


def test_parameter_counts():
    assert MODEL.linear_params_per_layer == 144
    assert MODEL.num_params == 2 * 144 + 40 + 5 * 4  # projections, tied embedding, 5 norms


def test_decode_step_memory_bound():
    # One sequence, context 3 (2 cached + 1 new).
    cost = Roofline(MODEL, HW, FP32).step([1], [3], n_logits=1)
    # FLOPs: 2*1*144*2 (linear) + 4*4*(1*2 + 1)*2 (attention) + 2*1*4*10 (LM head) = 752
    assert cost.flops == pytest.approx(752)
    # Bytes: 2*144*4 (weights) + 40*4 (LM head) + 32 * (3 read + 1 written) (KV: 2*2*1*2*4 = 32/token)
    assert cost.bytes == pytest.approx(1152 + 160 + 128)
    assert cost.compute_s == pytest.approx(0.752)
    assert cost.memory_s == pytest.approx(1.44)
    assert cost.time_s == pytest.approx(1.44) and cost.bound == "memory"


def test_prefill_step_compute_bound():
    rf = Roofline(MODEL, HW, FP32)
    cost = rf.ttft(batch=2, input_len=3)
    # T = 6; causal pairs 3*4/2 = 6 per prompt; FLOPs 2*6*144*2 + 4*4*12*2 + 2*2*4*10 = 4000
    assert cost.flops == pytest.approx(4000)
    assert cost.bytes == pytest.approx(1152 + 160 + 32 * 6)
    assert cost.time_s == pytest.approx(4.0) and cost.bound == "compute"


def test_overheads_and_serialised_time():
    eff = Efficiency(1.0, 1.0, 1.0, step_overhead_s=0.1, seq_overhead_s=0.01, overlap=False)
    cost = Roofline(MODEL, HW, FP32, efficiency=eff).step([1], [3], 1)
    assert cost.time_s == pytest.approx(0.752 + 1.44 + 0.1 + 0.01)
    half = Efficiency(0.5, 0.25, 1.0, 0.0, 0.0, True)
    assert Roofline(MODEL, HW, FP32, efficiency=half).step([1], [3], 1).time_s == pytest.approx(
        1.44 / 0.25)


def test_tensor_parallel_with_all_reduce():
    cost = Roofline(MODEL, HW, FP32, tp=2).step([1], [3], 1)
    # FLOPs and weight bytes halve; the single KV head is replicated; two all-reduces a layer of
    # 1*4*4 = 16 bytes, ring: 2*(2-1)/2 * 16 / 1000 = 0.016 s each, 4 in all.
    assert cost.flops == pytest.approx(376)
    assert cost.bytes == pytest.approx(576 + 80 + 128)
    assert cost.comm_s == pytest.approx(0.064)
    assert cost.time_s == pytest.approx(0.784 + 0.064)


def test_tpot_uses_mid_output_context():
    rf = Roofline(MODEL, HW, FP32)
    assert rf.tpot(batch=1, input_len=2, output_len=2).time_s == pytest.approx(
        rf.step([1], [3], 1).time_s)


def test_memory_fit():
    rf = Roofline(MODEL, HW, FP32)
    # 1152 projection bytes + (40 embedding + 20 norm) * 4 = 1392 bytes of weights.
    assert rf.weight_bytes() == pytest.approx(1392)
    assert rf.kv_bytes_per_sequence(3, 2) == pytest.approx(32 * 5)
    assert rf.max_batch_by_memory(3, 2) == math.floor((10000 - 1392) / 160)  # 53


def test_quantized_precisions():
    w4 = Precision.make("bf16", "w4a16")
    assert w4.weight_bytes == pytest.approx(0.5 + 2 / 128) and w4.compute_dtype == "bf16"
    assert Precision.make("bf16", "w8a8").compute_dtype == "int8"
    assert Precision.make("bf16", None, "fp8").kv_bytes == 1.0
    rf = Roofline(MODEL, HW, Precision.make("fp32", "w4a16"))
    assert rf.weight_bytes() == pytest.approx(288 * (0.5 + 2 / 128) + 60 * 4)
    with pytest.raises(InvalidRequestError):
        Precision.make("bf16", "w3a7")
    with pytest.raises(InvalidRequestError, match="int8"):
        Roofline(MODEL, HW, Precision.make("fp32", "w8a8")).step([1], [1], 1)
