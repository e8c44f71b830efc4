"""DeepSeek-V2 / V3 (MLA + DeepSeekMoE) against transformers' own DeepseekV2/V3 implementation of
the same tiny random configs and weights: logits of a mixed paged batch over the latent KV cache,
greedy tokens of the engine (batched, chunked prefill) against transformers' generate on saved
checkpoints, dummy weights, and clear refusals of what is not supported."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

from soarllm import LLM, SamplingParams
from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.kernels.attention import ReferenceAttentionBackend
from soarllm.model.loader import load_checkpoint
from soarllm.model.loader.layout import expected_tensors
from soarllm.model.registry import resolve_model_class
from tests.model.test_logits_vs_hf import BLOCK, PagedRun
from tests.tiny import train_tokenizer

# The engines hold a few short requests: a small KV pool instead of the CPU default (up to 4 GiB,
# millions of these 1-2 KiB blocks, each a Python object built at start-up).
KV = "32MiB"

# MLA widths all different, so a swapped dimension cannot pass; 8 experts in 4 groups
MLA = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=256, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
    n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
)
# DeepSeek's YaRN: cos/sin scaled by mscale / mscale_all_dim, the softmax by mscale_all_dim^2
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
        "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1,
        "original_max_position_embeddings": 64}


def v2_config(**kw):
    return DeepseekV2Config(**{**MLA, "vocab_size": 256, **kw})


def v3_config(**kw):
    return DeepseekV3Config(**{**MLA, "vocab_size": 256, "n_group": 4, "topk_group": 2, **kw})


CASES = {
    "v2-q_lora-group_limited-yarn": (
        v2_config(q_lora_rank=20, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                  rope_parameters=YARN),
        DeepseekV2ForCausalLM),
    "v2-q_proj-greedy": (v2_config(q_lora_rank=None, topk_method="greedy"), DeepseekV2ForCausalLM),
    "v3-q_lora-interleaved": (v3_config(q_lora_rank=20, norm_topk_prob=True),
                              DeepseekV3ForCausalLM),
    "v3-q_proj-neox-bias-yarn": (
        v3_config(q_lora_rank=None, rope_interleave=False, norm_topk_prob=False,
                  attention_bias=True, rope_parameters=YARN),
        DeepseekV3ForCausalLM),
}


def _randomize(hf):
    """Every weight random, norms around 1 and V3's correction bias large enough to change the
    experts chosen."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.1)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    return hf


def latent_caches(model, num_blocks=128):
    """One [1, blocks, BLOCK, 1, kv_lora_rank + qk_rope_head_dim] plane per layer."""
    assert model.latent_kv_cache
    return [torch.zeros(1, num_blocks, BLOCK, model.num_kv_heads, model.head_dim)
            for _ in range(model.num_layers)]


@pytest.mark.parametrize("name", list(CASES))
def test_mixed_batch_logits_match_transformers(name):
    cfg, hf_cls = CASES[name]
    cfg.architectures = [hf_cls.__name__]
    torch.manual_seed(0)
    hf = _randomize(hf_cls(cfg).eval())
    ours = resolve_model_class(cfg)(cfg, torch.float32, ReferenceAttentionBackend())
    ours.load_weights(hf.state_dict().items())

    seqs = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (9, 21, 6, 14)]
    run = PagedRun(ours, cfg, seqs)
    run.caches = latent_caches(ours)
    run.step([(0, 0, 8), (1, 0, 12), (2, 0, 5)])  # prefills, request 1 only its first chunk
    # decodes on cached latents, the rest of a prompt on its cached chunk, a fresh prefill
    got = run.step([(0, 8, 1), (2, 5, 1), (1, 12, 9), (3, 0, 14)])
    with torch.inference_mode():
        want = torch.stack([hf(torch.tensor([seqs[r]])).logits[0, -1] for r in (0, 2, 1, 3)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# --- saved checkpoints through the engine -------------------------------------------------------

TINY = {
    "v2": (DeepseekV2Config, DeepseekV2ForCausalLM,
           dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    "v3": (DeepseekV3Config, DeepseekV3ForCausalLM,
           dict(q_lora_rank=20, n_group=4, topk_group=2, norm_topk_prob=True)),
}


@pytest.fixture(scope="module", params=list(TINY))
def tiny_deepseek(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    cfg_cls, hf_cls, kw = TINY[request.param]
    tok = train_tokenizer(out)
    cfg = cfg_cls(**{**MLA, **kw, "num_hidden_layers": 2, "vocab_size": len(tok),
                     "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id})
    torch.manual_seed(0)
    hf = hf_cls(cfg)
    # large weights give peaked distributions: greedy choices not decided by float noise
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15 if "embed" in name or "lm_head" in name else 0.08)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    hf.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.eos_token_id}))
    return out


def test_checkpoint_names_are_what_transformers_saves(tiny_deepseek):
    """The dummy loader's names (loader/layout.py) are the saved checkpoint's."""
    from safetensors import safe_open

    ckpt = load_checkpoint(str(tiny_deepseek))
    with safe_open(str(tiny_deepseek / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: tuple(s) for k, (s, _) in expected_tensors(ckpt.config).items()} == saved


def test_greedy_tokens_equal_transformers_generate(tiny_deepseek):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 40))] for _ in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_deepseek), dtype=torch.float32).eval()
    with torch.inference_mode():
        want = [
            hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                        attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
            for p in prompts
        ]
    batched = LLM(str(tiny_deepseek), dtype="float32", kv_cache_memory=KV,
                  block_size=4, max_num_seqs=8)
    runner = batched.llm_engine.executor.runner
    cfg = runner.hf_config
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    # the latent cache: one plane, one "head" of the latent's width, nothing per attention head
    assert tuple(runner.kv_caches[0].shape[::3]) == (1, 1) and runner.kv_caches[0].shape[-1] == width
    assert runner.kv_bytes_per_block() == cfg.num_hidden_layers * 4 * width * 4
    assert [o.outputs[0].token_ids for o in batched.generate(prompts, params)] == want
    # every token forwarded (prompt + all but the last generated) routed to top_k experts, per
    # MoE layer (the warm-up's counts are cleared)
    forwarded = sum(len(p) + 9 for p in prompts)
    load = batched.llm_engine.executor.expert_load()
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert len(load) == moe_layers
    assert all(sum(layer) == forwarded * cfg.num_experts_per_tok for layer in load), load
    chunked = LLM(str(tiny_deepseek), dtype="float32", kv_cache_memory=KV,
                  block_size=4, max_num_batched_tokens=16,
                  enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in chunked.generate(prompts, params)] == want


def test_lookahead_decoding_keeps_greedy_tokens(tiny_deepseek):
    """Lookahead rows attend under custom masks over the latent cache (and an accepted candidate
    that is not the first has its KV moved there by the runner's one-plane copy): the tokens
    stay the plain engine's."""
    from tests.spec.test_lookahead import ALWAYS

    rng = random.Random(1)
    motif = [rng.randrange(3, 500) for _ in range(6)]
    prompts = [motif * 4, [rng.randrange(3, 500) for _ in range(17)]]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = LLM(str(tiny_deepseek), dtype="float32", kv_cache_memory=KV, block_size=4)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    spec = LLM(str(tiny_deepseek), dtype="float32", kv_cache_memory=KV,
               block_size=4, speculative_config=ALWAYS)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == want


def test_dummy_weights_load(tiny_deepseek):
    llm = LLM(str(tiny_deepseek), dtype="float32", kv_cache_memory=KV,
              load_format="dummy", block_size=4)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3,
                                                    ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,match", [
    (v2_config(topk_method="noaux_tc"), r"topk_method='noaux_tc' is not supported"),
    (v3_config(scoring_func="softmax"), r"scoring_func='softmax' is not supported"),
    (v2_config(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}),
     r"rope scaling type 'longrope' is not supported"),
    (v2_config(moe_layer_freq=2), r"moe_layer_freq=2 is not supported"),
])
def test_unsupported_config_is_a_clear_error(cfg, match):
    cfg.architectures = ["DeepseekV3ForCausalLM" if cfg.model_type == "deepseek_v3"
                         else "DeepseekV2ForCausalLM"]
    with pytest.raises(UnsupportedModelError, match=match):
        resolve_model_class(cfg)(cfg, torch.float32)


def test_bad_expert_groups_are_a_clear_error():
    cfg = v3_config(n_group=3, topk_group=2)  # 8 experts do not form 3 groups
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    with pytest.raises(ConfigError, match="fix n_group / topk_group in config.json"):
        resolve_model_class(cfg)(cfg, torch.float32)


def test_tensor_and_expert_parallel_splits_are_checked():
    from soarllm.distributed.multiproc import check_tensor_parallel

    cfg = v3_config()  # 4 heads, 8 experts: 2 ranks fit, 3 do not
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    for ep in (False, True):
        check_tensor_parallel(cfg, 2, "cpu", enable_expert_parallel=ep)
    with pytest.raises(ConfigError, match="attention heads"):
        check_tensor_parallel(cfg, 3, "cpu")
    with pytest.raises(ConfigError, match="splits the 6 experts over tensor_parallel_size=4 "
                       "ranks, which must divide 6"):
        check_tensor_parallel(v3_config(n_routed_experts=6, n_group=3, num_attention_heads=4,
                                        architectures=["DeepseekV3ForCausalLM"]), 4, "cpu",
                              enable_expert_parallel=True)


@pytest.mark.parametrize("ep", [False, True, "all_to_all"],
                         ids=["by-width", "expert-parallel", "expert-parallel-all-to-all"])
def test_greedy_tokens_over_two_ranks_equal_transformers(tiny_deepseek, ep):
    """MLA heads, dense MLP, shared experts and vocabulary over two ranks, the routed experts by
    width or whole (their tokens summed by the all-reduce or sent to them all-to-all); the
    latent cache whole on each rank: transformers' greedy tokens and their log-probabilities,
    with chunked prefill beside decodes."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 40))] for _ in range(4)]
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_deepseek), dtype=torch.float32).eval()
    want, want_lp = [], []
    with torch.inference_mode():
        for p in prompts:
            gen = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                              min_new_tokens=10,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long))
            new = gen[0, len(p):]
            lp = torch.log_softmax(hf(gen[:, :-1]).logits[0, len(p) - 1:].double(), dim=-1)
            want.append(new.tolist())
            want_lp.append(lp.gather(1, new[:, None])[:, 0])
    llm = LLM(str(tiny_deepseek), dtype="float32", kv_cache_memory=KV, block_size=4,
              tensor_parallel_size=2, enable_expert_parallel=bool(ep),
              expert_dispatch=ep if isinstance(ep, str) else "all_reduce",
              max_num_batched_tokens=16, enable_prefix_caching=False)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)
        outs = [o.outputs[0] for o in llm.generate(prompts, sp)]
        per_rank = llm.llm_engine.executor.collective_rpc("parameter_bytes", ".experts.")
    finally:
        llm.llm_engine.shutdown()
    assert [o.token_ids for o in outs] == want
    for o, ref in zip(outs, want_lp):
        ours = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)],
                            dtype=torch.float64)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    whole = sum(p.numel() * p.element_size() for n, p in hf.named_parameters()
                if ".experts." in n and "shared" not in n)
    assert per_rank == [whole // 2] * 2


def test_triton_backend_is_refused_for_the_latent_cache(tiny_deepseek):
    with pytest.raises(ConfigError, match="use attention_backend='reference' or 'auto'"):
        LLM(str(tiny_deepseek), dtype="float32", kv_cache_memory=KV, attention_backend="triton")
