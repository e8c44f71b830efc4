"""Mixture-of-Experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers' own
implementation of the same config and weights: the fused experts layer against transformers'
experts modules, logits of a mixed paged batch, and greedy tokens of the engine (batched, and
with chunked prefill) against transformers' generate on saved tiny checkpoints."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from soarllm import LLM, SamplingParams
from soarllm.errors import ConfigError
from soarllm.kernels.attention import ReferenceAttentionBackend
from soarllm.model.layers.fused_moe import (
    FusedMoE,
    fused_experts,
    grouped_topk,
    per_expert_loop,
    select_experts,
)
from soarllm.model.loader import load_checkpoint
from soarllm.model.loader.layout import expected_tensors
from soarllm.model.registry import resolve_model_class
from tests.model.test_logits_vs_hf import PagedRun
from tests.tiny import make_tiny_model

# The engines hold a few short requests: a small KV pool instead of the CPU default (up to 4 GiB,
# millions of these 1-2 KiB blocks, each a Python object built at start-up).
KV = "32MiB"

SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
CASES = {
    "mixtral": (MixtralConfig(**SMALL, num_local_experts=6, num_experts_per_tok=2),
                MixtralForCausalLM),
    "mixtral-sliding-window": (
        MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=1, sliding_window=6),
        MixtralForCausalLM),
    # shared expert, no renormalisation, a dense layer (mlp_only_layers) and a sparse step of 1
    "qwen2_moe": (
        Qwen2MoeConfig(**SMALL, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, norm_topk_prob=False,
                       mlp_only_layers=[1]),
        Qwen2MoeForCausalLM),
    "qwen2_moe-sparse-step-2": (
        Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=3, moe_intermediate_size=32,
                       shared_expert_intermediate_size=40, norm_topk_prob=True,
                       decoder_sparse_step=2),
        Qwen2MoeForCausalLM),
    # layer_types: layer 0 slides (window 5), layers 1 and 2 attend globally
    "qwen2_moe-sliding-window": (
        Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=40, use_sliding_window=True,
                       sliding_window=5, max_window_layers=1),
        Qwen2MoeForCausalLM),
    "qwen3_moe": (
        Qwen3MoeConfig(**SMALL, head_dim=24, num_experts=8, num_experts_per_tok=3,
                       moe_intermediate_size=32, norm_topk_prob=True),
        Qwen3MoeForCausalLM),
}


def _randomized(hf_cls, cfg):
    torch.manual_seed(0)
    hf = hf_cls(cfg).eval()
    with torch.no_grad():  # every weight random, norms around 1, so routing is not uniform
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.1)
    return hf


# --- the layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
def test_routing_equals_transformers_router(renormalize):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    cfg = Qwen2MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=3,
                         norm_topk_prob=renormalize)
    router = Qwen2MoeTopKRouter(cfg)
    torch.manual_seed(1)
    router.weight.data.normal_()
    x = torch.randn(50, 32)
    logits, want_w, want_ids = router(x)
    got_w, got_ids = select_experts(logits, 3, renormalize)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w)
    if renormalize:
        torch.testing.assert_close(got_w.sum(-1), torch.ones(50))


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_fused_experts_equal_transformers_experts(tokens):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=48, intermediate_size=80, num_local_experts=8,
                        num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(cfg).eval()
    torch.manual_seed(tokens)
    for p in block.parameters():
        p.data.normal_(0.0, 0.2)
    x = torch.randn(tokens, 48)
    with torch.no_grad():
        want = block(x[None])[0]
    ours = FusedMoE(8, 2, 48, 80, renormalize=True)
    ours.gate_up_proj.data.copy_(block.experts.gate_up_proj)
    ours.down_proj.data.copy_(block.experts.down_proj)
    got = ours(x, x @ block.gate.weight.t())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the benchmark's dense reference computes the same
    w, ids = select_experts(x @ block.gate.weight.t(), 2, True)
    loop = per_expert_loop(x, ours.gate_up_proj, ours.down_proj, w, ids)
    torch.testing.assert_close(loop, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["by-width", "by-expert"])
@pytest.mark.parametrize("stacked", [False, True], ids=["per-expert", "stacked"])
def test_rank_shards_sum_to_transformers_experts(expert_parallel, stacked):
    """Two ranks' experts (split by width, or whole experts [0, 4) and [4, 8)), each loaded from
    the full checkpoint tensors through its own weight_loader: their partial outputs add up to
    transformers' block, and each holds half of the bytes."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from soarllm.model.parallel_state import TPGroup

    cfg = MixtralConfig(hidden_size=48, intermediate_size=80, num_local_experts=8,
                        num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(cfg).eval()
    torch.manual_seed(5)
    for p in block.parameters():
        p.data.normal_(0.0, 0.2)
    x = torch.randn(33, 48)
    with torch.no_grad():
        want = block(x[None])[0]
    gate_up, down = block.experts.gate_up_proj.data, block.experts.down_proj.data
    total = torch.zeros_like(want)
    for rank in range(2):
        ours = FusedMoE(8, 2, 48, 80, renormalize=True, tp=TPGroup(rank=rank, world_size=2),
                        expert_parallel=expert_parallel)
        if stacked:
            ours.gate_up_proj.weight_loader(ours.gate_up_proj, gate_up, None)
            ours.down_proj.weight_loader(ours.down_proj, down, None)
        else:
            for e in range(8):
                for part, t in (("gate", gate_up[e, :80]), ("up", gate_up[e, 80:]),
                                ("down", down[e])):
                    param = ours.down_proj if part == "down" else ours.gate_up_proj
                    param.weight_loader(param, t, (e, part))
        assert ours.gate_up_proj.numel() + ours.down_proj.numel() == (gate_up.numel()
                                                                       + down.numel()) // 2
        total += ours(x, x @ block.gate.weight.t())
        assert ours.expert_load.sum() == 33 * 2  # every token's routing, on every rank
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_experts_see_only_their_tokens():
    """An expert whose weights are NaN poisons exactly the tokens routed to it."""
    w13, w2 = torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    w13[2] = float("nan")
    ids = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2]])
    out = fused_experts(torch.randn(4, 8), w13, w2, torch.full((4, 2), 0.5), ids)
    assert out.isnan().any(-1).tolist() == [False, True, False, True]


def test_more_experts_per_token_than_experts_is_a_clear_error():
    cfg = MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
    cfg.num_experts_per_tok = 6
    cfg.architectures = ["MixtralForCausalLM"]
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=6 must be between 1 and the number of experts \(4\)"):
        resolve_model_class(cfg)(cfg, torch.float32)


def test_engine_refuses_more_experts_per_token_than_experts(tmp_path):
    import json
    import shutil

    directory = tmp_path / "bad"
    shutil.copytree(make_tiny_model(tmp_path / "ok", "mixtral"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["num_experts_per_tok"] = 5
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="fix num_experts_per_tok in config.json"):
        LLM(str(directory), dtype="float32")


def test_checkpoint_lacking_an_expert_is_a_clear_error():
    cfg, hf_cls = CASES["mixtral"]
    cfg.architectures = [hf_cls.__name__]
    ours = resolve_model_class(cfg)(cfg, torch.float32)
    tensors = {name: torch.zeros(shape) for name, (shape, _) in expected_tensors(cfg).items()}
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 expert tensors of model.layers.1.mlp.experts"):
        ours.load_weights(tensors.items())


# --- whole models -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_mixed_batch_logits_match_transformers(name):
    cfg, hf_cls = CASES[name]
    cfg.architectures = [hf_cls.__name__]
    hf = _randomized(hf_cls, cfg)
    ours = resolve_model_class(cfg)(cfg, torch.float32, ReferenceAttentionBackend())
    ours.load_weights(hf.state_dict().items())  # transformers 5 keeps the experts stacked

    seqs = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (9, 21, 6, 14)]
    run = PagedRun(ours, cfg, seqs)
    run.step([(0, 0, 8), (1, 0, 12), (2, 0, 5)])  # prefills, request 1 only its first chunk
    got = run.step([(0, 8, 1), (2, 5, 1), (1, 12, 9), (3, 0, 14)])
    with torch.inference_mode():
        want = torch.stack([hf(torch.tensor([seqs[r]])).logits[0, -1] for r in (0, 2, 1, 3)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


FAMILIES = {
    "mixtral": {},
    "qwen2_moe": {"mlp_only_layers": [0]},
    "qwen3_moe": {"head_dim": 32, "norm_topk_prob": True},
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_moe(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param), request.param,
                           **FAMILIES[request.param])


def test_checkpoint_names_are_what_transformers_saves(tiny_moe):
    from safetensors import safe_open

    ckpt = load_checkpoint(str(tiny_moe))
    with safe_open(str(tiny_moe / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert any(".experts.3." in k for k in saved)  # per-expert tensors on disk
    assert {k: tuple(s) for k, (s, _) in expected_tensors(ckpt.config).items()} == saved


def test_greedy_tokens_equal_transformers_generate(tiny_moe):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 40))] for _ in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_moe), dtype=torch.float32).eval()
    with torch.inference_mode():
        want = [
            hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                        attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
            for p in prompts
        ]
    batched = LLM(str(tiny_moe), dtype="float32", kv_cache_memory=KV, block_size=4, max_num_seqs=8)
    assert [o.outputs[0].token_ids for o in batched.generate(prompts, params)] == want
    chunked = LLM(str(tiny_moe), dtype="float32", kv_cache_memory=KV,
                  block_size=4, max_num_batched_tokens=16,
                  enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, params)] == want


def test_dummy_weights_load(tiny_moe):
    llm = LLM(str(tiny_moe), dtype="float32", kv_cache_memory=KV, load_format="dummy", block_size=4)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3,
                                                    ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.slow  # the compiled engine spends tens of seconds in inductor
def test_compiled_engine_equals_eager(tmp_path):
    """Under torch.compile (fullgraph) the experts run as the custom op soarllm::fused_experts:
    the warm-up compiles without falling back, and greedy tokens and the tokens routed per
    expert equal the eager engine's."""
    directory = make_tiny_model(tmp_path, "qwen2_moe", mlp_only_layers=[1])
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(3, 50))] for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    eager = LLM(str(directory), dtype="float32", kv_cache_memory=KV,
                block_size=4, enforce_eager=True)
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    compiled = LLM(str(directory), dtype="float32", kv_cache_memory=KV,
                   block_size=4, enforce_eager=False,
                   max_num_batched_tokens=32)
    runner = compiled.llm_engine.executor.runner
    assert runner.backbone is not runner.model.model, "the warm-up fell back to eager"
    assert [o.outputs[0].token_ids for o in compiled.generate(prompts, params)] == want
    # the routed-token counters (a buffer the compiled graph mutates) count the same tokens
    assert compiled.llm_engine.get_stats().expert_load == eager.llm_engine.get_stats().expert_load


def _by_expert(weights, ids):
    """Routing as a set per token (transformers' top-k is unsorted)."""
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


@pytest.mark.parametrize("top_k,groups,kept", [(6, 8, 3), (2, 4, 1), (4, 1, 1)])
def test_grouped_topk_equals_deepseek_v2_router(top_k, groups, kept):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = DeepseekV2Config(hidden_size=32, n_routed_experts=32, num_experts_per_tok=top_k,
                           n_group=groups, topk_group=kept, topk_method="group_limited_greedy",
                           routed_scaling_factor=16.0)
    router = DeepseekV2TopkRouter(cfg)
    torch.manual_seed(top_k)
    router.weight.data.normal_()
    logits, want_w, want_ids = router(torch.randn(40, 32))
    got_w, got_ids = grouped_topk(logits, top_k, groups, kept, "softmax", scaling_factor=16.0)
    want_w, want_ids = _by_expert(want_w, want_ids)
    got_w, got_ids = _by_expert(got_w, got_ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w)


@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_topk_equals_deepseek_v3_router(renormalize):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=64, num_experts_per_tok=8,
                           n_group=8, topk_group=4, norm_topk_prob=renormalize,
                           routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(cfg)
    torch.manual_seed(7)
    router.weight.data.normal_()
    router.e_score_correction_bias.normal_(0.0, 0.5)  # large enough to change the choices
    logits, want_w, want_ids = router(torch.randn(40, 32))
    got_w, got_ids = grouped_topk(logits, 8, 8, 4, "sigmoid", router.e_score_correction_bias,
                                  renormalize, 2.5)
    want_w, want_ids = _by_expert(want_w, want_ids)
    got_w, got_ids = _by_expert(got_w, got_ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w)
    unbiased, _ = grouped_topk(logits, 8, 8, 4, "sigmoid", None, renormalize, 2.5)
    assert not torch.equal(_by_expert(unbiased, _)[1], got_ids)  # the bias mattered


def test_grouped_topk_bad_groups_is_a_clear_error():
    with pytest.raises(ConfigError, match="fix n_group / topk_group"):
        grouped_topk(torch.randn(3, 10), 2, 4, 1)
