"""One 1M-token request: devices from memory arithmetic done here, ring-attention prefill."""

from __future__ import annotations

import math

import pytest

from soarllm.errors import InvalidRequestError
from soarllm.plan.hardware import load_catalog
from soarllm.plan.long_context import (
    context_parallel_row,
    fewest_devices,
    plan_context_parallel,
    smallest_cp,
)
from soarllm.plan.model_shape import load_model_shape
from soarllm.plan.roofline import Precision

CATALOG = {h.id: h for h in load_catalog()}
H100 = CATALOG["h100-sxm"]
TOKENS = 1_000_000 + 1000
USABLE = 80 * 2**30 * 0.9


def test_llama70b_million_tokens_devices_by_hand():
    m = load_model_shape("Llama-3-70B")
    rows = {r.tp: r for r in plan_context_parallel(m, H100, Precision.make("bf16"), 1_000_000,
                                                   1000)}

    def need(tp: int, cp: int) -> float:
        local = math.ceil(TOKENS / cp)
        weights = m.num_params * 2 / tp  # everything bf16, split by TP
        kv = 2 * 80 * (8 // tp) * 128 * 2 * local  # tp <= 8 KV heads: 8 / tp heads a rank
        act = (2 * 8192 + (64 + 2 * 8) * 128 / tp + 2 * 28672 / tp) * 2 * local
        return weights + kv + act

    for tp in (2, 4, 8):
        cp = next(c for c in range(1, 1000) if need(tp, c) <= USABLE)
        assert rows[tp].cp == cp and rows[tp].devices == tp * cp
        assert need(tp, cp - 1) > USABLE if cp > 1 else True
    assert 1 not in rows  # 141 GB of weights never fit one 80 GB card
    # One copy of the KV cache: 327680 bytes a token.
    assert rows[8].kv_gib_total == pytest.approx(327680 * TOKENS / 2**30)
    best = fewest_devices(list(rows.values()))
    assert best.devices == min(r.devices for r in rows.values())


def test_deepseek_v3_million_tokens_devices_by_hand():
    m = load_model_shape("DeepSeek-V3")
    p = Precision.make("bf16", "fp8")
    fp8 = 1 + 4 / 128**2

    def need(cp: int) -> float:  # TP 1: attention whole, 256 experts over cp devices
        local = math.ceil(TOKENS / cp)
        weights = (m.non_expert_linear_params * fp8 + (m.table_params + m.norm_params) * 2
                   + m.routed_expert_params * fp8 / cp)
        kv = 61 * (512 + 64) * 2 * local
        act = (2 * 7168 + 128 * (2 * 128 + 64 + 128) + 512 + 64 + 2 * 18432) * 2 * local
        return weights + kv + act

    cp = next(c for c in range(1, 1000) if 256 % c == 0 and need(c) <= USABLE)
    assert smallest_cp(m, H100, p, 1, TOKENS) == cp
    # The weights alone need 671 GB / 72 GiB > 8 devices.
    assert cp * 1 > m.num_params * fp8 / USABLE


def test_ring_attention_prefill_overlap_assumption():
    m = load_model_shape("Llama-3-70B")
    p = Precision.make("bf16")
    one = context_parallel_row(m, H100, p, 8, 2, 1_000_000, 1000)
    four = context_parallel_row(m, H100, p, 8, 4, 1_000_000, 1000)
    # Attention: S (S + 1) / 2 pairs x 4 x 64 x 128 FLOPs x 80 layers, split over 8 x cp
    # devices; projections 2 x S / cp tokens x parameters / 8; all at 60 % of 989 TFLOPS.
    # Two ring all-reduces a layer over TP 8 of the local 500k tokens' hidden states on NVLink.
    peak = 989e12 * 0.6
    attn = 1e6 * (1e6 + 1) / 2 * 4 * 64 * 128 * 80 / 16 / peak
    proj = 2 * 500_000 * m.active_linear_params / 8 / peak
    comm = 160 * (2 * 7 / 8 * 500_000 * 8192 * 2 / (450e9 * 0.7) + 10e-6)
    assert one.prefill_s == pytest.approx(attn + proj + comm + 0.001, rel=0.01)
    assert attn > 0.8 * one.prefill_s  # the quadratic term dominates at 1M tokens
    assert four.prefill_s < one.prefill_s / 1.8
    assert one.prefill_serial_s == pytest.approx(one.prefill_s + min(attn, one.ring_transfer_s),
                                                 rel=0.01)
    assert four.ring_transfer_s > 0 and four.nodes == 4


def test_bad_lengths():
    with pytest.raises(InvalidRequestError, match="input-len"):
        plan_context_parallel(load_model_shape("Llama-3-8B"), H100, Precision.make("bf16"), 0, 1)
