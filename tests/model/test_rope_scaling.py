"""Rope scaling families against transformers' own functions (ROPE_INIT_FUNCTIONS and the models'
rotary embeddings), at positions far beyond the context the model was trained on; then whole
models with YaRN and dynamic NTK against transformers' logits and greedy tokens."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from soarllm import LLM, SamplingParams
from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.kernels.attention import ReferenceAttentionBackend
from soarllm.model.layers.rotary import (
    RotaryEmbedding,
    inv_frequencies,
    rope_max_position,
    rope_parameters,
)
from soarllm.model.registry import resolve_model_class
from tests.model.test_logits_vs_hf import PagedRun
from tests.tiny import make_tiny_model

ORIGINAL = 2048  # the trained context of the configs below
SCALINGS = {
    "dynamic-2": {"rope_type": "dynamic", "factor": 2.0},
    "dynamic-8": {"rope_type": "dynamic", "factor": 8.0},
    "yarn-4": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    # DeepSeek-V2/V3 style: attention factor from mscale / mscale_all_dim, other betas
    "yarn-deepseek": {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                      "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                      "original_max_position_embeddings": ORIGINAL // 4},
    "yarn-mscale-ratio": {"rope_type": "yarn", "factor": 16.0, "mscale": 1.0,
                          "mscale_all_dim": 0.5, "original_max_position_embeddings": ORIGINAL},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.9,
                              "beta_fast": 16, "beta_slow": 2,
                              "original_max_position_embeddings": ORIGINAL},
    "yarn-no-truncate": {"rope_type": "yarn", "factor": 4.0, "truncate": False,
                         "original_max_position_embeddings": ORIGINAL},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
}


def _config(scaling: dict, head_dim=128, partial=None, **kw):
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_theta=500000.0,
                      max_position_embeddings=kw.pop("max_position_embeddings", ORIGINAL),
                      rope_scaling=dict(scaling), **kw)
    if partial is not None:  # as Phi / GLM configs write it
        cfg.rope_parameters["partial_rotary_factor"] = partial
    return cfg


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("seq_len", [ORIGINAL // 2, ORIGINAL * 3, ORIGINAL * 8 + 5])
def test_frequencies_equal_transformers(name, seq_len):
    scaling = SCALINGS[name]
    cfg = _config(scaling)
    want, want_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu", seq_len=seq_len)
    got, got_scale = inv_frequencies(128, rope_parameters(cfg), seq_len=seq_len)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got_scale == pytest.approx(want_scale, rel=1e-12)


@pytest.mark.parametrize("name", ["dynamic-8", "yarn-4", "yarn-deepseek"])
def test_partial_rotary_dims_equal_transformers(name):
    cfg = _config(SCALINGS[name], head_dim=96, partial=0.5)
    want, _ = ROPE_INIT_FUNCTIONS[SCALINGS[name]["rope_type"]](cfg, "cpu", seq_len=ORIGINAL * 6)
    got, _ = inv_frequencies(48, rope_parameters(cfg), seq_len=ORIGINAL * 6)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["dynamic-2", "dynamic-8", "yarn-4", "yarn-deepseek",
                                  "yarn-attention-factor"])
def test_cos_sin_far_beyond_the_trained_context_equal_transformers(name):
    """Our table against transformers' LlamaRotaryEmbedding over the whole stretched range (for
    dynamic NTK transformers computes its base from that length, the one our table is built for)."""
    cfg = _config(SCALINGS[name], head_dim=64)
    length = rope_max_position(cfg)
    assert length > ORIGINAL
    ours = RotaryEmbedding(64, cfg.max_position_embeddings, rope_parameters(cfg))
    assert ours.cos.shape[0] == length
    hf = LlamaRotaryEmbedding(cfg)
    positions = torch.arange(length)
    want_cos, want_sin = hf(torch.zeros(1, dtype=torch.float32), positions[None])
    got_cos, got_sin = ours.lookup(positions, torch.float32)
    far = positions >= length - 512  # the last positions, far past the trained context
    torch.testing.assert_close(got_cos[:, 0][far], want_cos[0][far], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_sin[:, 0][far], want_sin[0][far], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_cos[:, 0], want_cos[0], rtol=1e-5, atol=1e-5)


def test_stretched_context_lengths():
    assert rope_max_position(_config(SCALINGS["dynamic-8"])) == ORIGINAL * 8
    assert rope_max_position(_config(SCALINGS["yarn-4"])) == ORIGINAL * 4
    # Qwen2.5's long-context recipe: max_position_embeddings already the stretched length
    qwen = Qwen2Config(max_position_embeddings=131072, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert rope_max_position(qwen) == 131072
    assert rope_max_position(_config(SCALINGS["llama3"])) == ORIGINAL
    assert rope_max_position(_config(SCALINGS["linear"])) == ORIGINAL


@pytest.mark.parametrize("kind", ["longrope", "made-up"])
def test_unsupported_rope_type_is_a_clear_error(kind):
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4)
    params = {**rope_parameters(cfg), "rope_type": kind, "factor": 2.0}
    with pytest.raises(UnsupportedModelError, match=rf"{kind!r} is not supported .* dynamic, yarn"):
        RotaryEmbedding(16, 64, params)


# --- whole models -----------------------------------------------------------------------------

SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)


def _models(cfg):
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in n else p.normal_(0.0, 0.1)
    ours = resolve_model_class(cfg)(cfg, torch.float32, ReferenceAttentionBackend())
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def test_yarn_model_logits_far_past_the_trained_context():
    cfg = LlamaConfig(**SMALL, max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    hf, ours = _models(cfg)
    seqs = [torch.randint(0, 256, (n,)).tolist() for n in (61, 40, 9)]
    run = PagedRun(ours, cfg, seqs)
    run.step([(0, 0, 30), (1, 0, 39), (2, 0, 8)])
    got = run.step([(1, 39, 1), (2, 8, 1), (0, 30, 31)])  # positions up to 60, 4x the trained 16
    with torch.inference_mode():
        want = torch.stack([hf(torch.tensor([seqs[r]])).logits[0, -1] for r in (1, 2, 0)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dynamic_ntk_model_logits_at_the_stretched_length():
    """transformers stretches the base for the forward's length; at the length our table is built
    for (max_position_embeddings x factor) both compute the same logits."""
    cfg = LlamaConfig(**SMALL, max_position_embeddings=16,
                      rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    hf, ours = _models(cfg)
    seq = torch.randint(0, 256, (64,)).tolist()
    run = PagedRun(ours, cfg, [seq])
    run.step([(0, 0, 40)])
    got = run.step([(0, 40, 24)])
    with torch.inference_mode():
        want = hf(torch.tensor([seq])).logits[0, -1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_yarn_engine_greedy_tokens_equal_transformers_generate(tmp_path):
    directory = make_tiny_model(tmp_path, "llama", max_position_embeddings=256, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32})
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (90, 150, 40)]
    hf = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.inference_mode():
        want = [
            hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                        attention_mask=torch.ones(1, len(p), dtype=torch.long))[0, len(p):].tolist()
            for p in prompts
        ]
    llm = LLM(str(directory), dtype="float32", block_size=8, max_num_batched_tokens=64,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want


def test_engine_serves_the_stretched_context(tmp_path):
    """Dynamic NTK x4 on a model trained on 32 positions: the engine takes prompts up to 128
    tokens, and no longer ones, and its prompt logits there are transformers' at that length."""
    directory = make_tiny_model(tmp_path, "llama", max_position_embeddings=32,
                                rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    llm = LLM(str(directory), dtype="float32", block_size=8, enable_prefix_caching=False)
    assert llm.llm_engine.max_model_len == 128
    prompt = random.Random(1).choices(range(3, 500), k=127)
    hf = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.inference_mode():  # 128 positions: the length our table's base is stretched for
        want = hf(torch.tensor([prompt + [0]])).logits[0, -2].argmax().item()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    assert out[0].outputs[0].token_ids == [want]
    with pytest.raises(ConfigError, match="max_model_len=129 exceeds"):
        LLM(str(directory), dtype="float32", max_model_len=129)
