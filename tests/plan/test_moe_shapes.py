"""MoE and MLA shapes against published parameter counts, the expected-distinct-experts formula
against a Monte-Carlo draw, and KV bytes per token computed by hand from each config."""

from __future__ import annotations

import numpy as np
import pytest

from soarllm.errors import ModelNotFoundError
from soarllm.plan.hardware import load_catalog
from soarllm.plan.model_shape import ModelShape, load_model_shape
from soarllm.plan.roofline import Precision, Roofline

# (total, active) from each model's release: Mistral AI's Mixtral post, the Qwen model cards,
# the DeepSeek-V2 / V3 papers and the Kimi K2 report.
PUBLISHED = {
    "Mixtral-8x7B": (46.7e9, 12.9e9, 0.005),
    "Qwen3-30B-A3B": (30.5e9, 3.3e9, 0.02),
    "Qwen3-235B-A22B": (235e9, 22e9, 0.02),
    "Qwen2-57B-A14B": (57e9, 14e9, 0.02),
    "DeepSeek-V2": (236e9, 21e9, 0.03),
    "DeepSeek-V3": (671e9, 37e9, 0.03),
    "Kimi-K2": (1.04e12, 32e9, 0.03),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_and_active_parameters_match_published(name):
    total, active, rel = PUBLISHED[name]
    shape = load_model_shape(name)
    assert shape.is_moe
    assert shape.num_params == pytest.approx(total, rel=rel)
    assert shape.num_active_params == pytest.approx(active, rel=max(rel, 0.03))


def test_deepseek_v3_layers_and_experts_from_config():
    m = load_model_shape("deepseek-v3")
    # first_k_dense_replace = 3 of 61 layers; 256 routed + 1 shared expert of 3 x 7168 x 2048.
    assert (m.num_dense_layers, m.num_moe_layers) == (3, 58)
    assert m.expert_params == 3 * 7168 * 2048
    assert m.routed_expert_params == 58 * 256 * 3 * 7168 * 2048
    # MLA projections of one layer: q_a 7168x1536, q_b 1536x128x192, kv_a 7168x(512+64),
    # kv_b 512x128x(128+128), o 128x128x7168.
    assert m.attention_params_per_layer == (7168 * 1536 + 1536 * 128 * 192 + 7168 * 576
                                            + 512 * 128 * 256 + 128 * 128 * 7168)


def test_expected_distinct_experts_matches_monte_carlo():
    m = load_model_shape("DeepSeek-V3")  # 256 experts, top-8
    rng = np.random.default_rng(0)
    for tokens in (1, 4, 32, 128):
        draws = [len({e for _ in range(tokens) for e in rng.choice(256, 8, replace=False)})
                 for _ in range(400)]
        assert m.expected_distinct_experts(tokens) == pytest.approx(np.mean(draws), rel=0.02)
    assert m.expected_distinct_experts(1) == pytest.approx(8)
    assert m.expected_distinct_experts(10_000) == pytest.approx(256)
    assert load_model_shape("Llama-3-8B").expected_distinct_experts(64) == 0


def test_kv_bytes_per_token_mla_vs_gqa_by_hand():
    v3, llama = load_model_shape("DeepSeek-V3"), load_model_shape("Llama-3-70B")
    # MLA caches kv_lora_rank + qk_rope_head_dim = 512 + 64 values a layer, bf16, 61 layers,
    # whole on every TP rank.
    assert v3.kv_bytes_per_token(2) == 61 * (512 + 64) * 2 == 70272
    assert v3.kv_bytes_per_token(2, tp=8) == 70272
    # GQA: K and V of 8 heads of 128, 80 layers; TP splits heads until one per rank.
    assert llama.kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2 == 327680
    assert llama.kv_bytes_per_token(2, tp=8) == 327680 / 8
    assert llama.kv_bytes_per_token(2, tp=16) == 327680 / 8  # KV heads replicated past 8
    # The same attention without MLA (K and V of 128 heads of 128) would cache 2*61*128*128*2.
    assert 2 * 61 * 128 * 128 * 2 / 70272 > 50


def test_decode_reads_the_touched_experts():
    m = load_model_shape("Mixtral-8x7B")
    h100 = next(h for h in load_catalog() if h.id == "h100-sxm")
    rf = Roofline(m, h100, Precision.make("bf16"))
    expert = 3 * 4096 * 14336 * 2  # bytes of one expert
    for batch in (1, 3, 16):
        distinct = 8 * (1 - (1 - 2 / 8) ** batch)
        assert rf.expert_bytes_read(batch) == pytest.approx(32 * distinct * expert)
    # Under EP over 8 devices, two replicas of TP=4 route 2 x 3 tokens to each device's share.
    ep = Roofline(m, h100, Precision.make("bf16"), tp=4, ep=8)
    assert ep.expert_bytes_read(3) == pytest.approx(32 * 8 * (1 - 0.75 ** 6) * expert / 8)


def test_bad_moe_config_is_a_clear_error():
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "vocab_size": 100, "num_local_experts": 4,
           "num_experts_per_tok": 6}
    with pytest.raises(ModelNotFoundError, match="num_experts_per_tok=6"):
        ModelShape.from_config(cfg, "bad")
