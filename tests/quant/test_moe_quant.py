"""Quantized experts (quant/moe.py): W8A16 and W4A16 Mixture-of-Experts layers against an oracle
built with torch ops here, transformers' model of the same config whose weights are replaced by
their round-to-nearest dequantized values, for Mixtral, Qwen2-MoE (shared expert) and Qwen3-MoE.

The engine test uses input sizes that are not multiples of 32, so the W8A16 Linear layers run
their dequantize-then-F.linear path and the whole model is float32 math (the bfloat16 CPU
kernel takes multiples of 32 only): the tolerance is float32's."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from soarllm import LLM, SamplingParams
from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.kernels.attention import ReferenceAttentionBackend
from soarllm.model.layers.fused_moe import FusedMoE
from soarllm.model.registry import resolve_model_class
from soarllm.quant.base import QuantizationConfig, UnquantizedMethod
from soarllm.quant.config import RTNConfig
from soarllm.quant.moe import W4A16FusedMoEMethod, W8A16FusedMoEMethod
from tests.model.test_logits_vs_hf import PagedRun
from tests.tiny import make_tiny_model

# hidden 48, head_dim 12, widths 112 / 80: no Linear input size is a multiple of 32
ODD = dict(hidden_size=48, intermediate_size=112)
FAMILIES = {
    "mixtral": {},
    "qwen2_moe": {"shared_expert_intermediate_size": 80, "moe_intermediate_size": 64},
    "qwen3_moe": {"norm_topk_prob": True, "moe_intermediate_size": 64},
}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SOARLLM_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_moe(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param), request.param,
                           **ODD, **FAMILIES[request.param])


def rtn_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8, dequantized: one scale per row of the last dim."""
    scale = w.abs().amax(dim=-1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def rtn_int4(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Asymmetric int4 per group of the last dim (min/max RTN), dequantized."""
    g = w.reshape(*w.shape[:-1], w.shape[-1] // group, group)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / 15
    return (torch.round((g - lo) / scale).clamp(0, 15) * scale + lo).reshape(w.shape)


def is_expert(name: str) -> bool:
    return name.endswith((".experts.gate_up_proj", ".experts.down_proj"))


def oracle(directory, quantize, which) -> torch.nn.Module:
    """transformers on the saved weights, those that `which` names replaced by quantize(w)."""
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if which(name):
                p.copy_(quantize(p))
    return hf


def paged_logits(model, cfg, seqs):
    run = PagedRun(model, cfg, seqs)
    run.step([(0, 0, 8), (1, 0, 12), (2, 0, 5)])
    return run.step([(0, 8, 1), (2, 5, 1), (1, 12, 9), (3, 0, 14)])


def reference_logits(hf, seqs):
    with torch.inference_mode():
        return torch.stack([hf(torch.tensor([seqs[r]])).logits[0, -1] for r in (0, 2, 1, 3)])


def seqs_for(cfg):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in (9, 21, 6, 14)]


def expert_bytes(model) -> tuple[int, int]:
    """(bytes the experts' parameters hold, bytes of the same experts in float32)."""
    held = float32 = 0
    for m in model.modules():
        if isinstance(m, FusedMoE):
            held += sum(p.numel() * p.element_size() for p in m.parameters())
            e, i, h = m.local_experts, m.local_intermediate, m.hidden_size
            float32 += 4 * e * 3 * i * h
    return held, float32


def test_engine_w8a16_quantizes_experts_and_matches_the_oracle(tiny_moe):
    """quantization="w8a16": every linear layer but lm_head and the routers, and every expert,
    int8 per output row; logits and greedy tokens equal transformers on those weights."""
    llm = LLM(str(tiny_moe), dtype="float32", quantization="w8a16", block_size=4)
    model = llm.llm_engine.executor.runner.model
    model.attn_backend = ReferenceAttentionBackend()
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(m.gate_up_proj.dtype == torch.int8 for m in experts)
    assert all(m.down_proj.dtype == torch.int8 for m in experts)
    for name, m in model.named_modules():  # routers (and the shared expert's gate) stay float
        if name.endswith((".gate", ".shared_expert_gate")):
            assert isinstance(m.quant_method, UnquantizedMethod) and m.weight.dtype == torch.float32
    held, float32 = expert_bytes(model)
    assert 0.25 <= held / float32 < 0.3  # int8 values + one float32 scale per row

    hf = oracle(tiny_moe, rtn_int8, lambda n: is_expert(n) or n.endswith("_proj.weight"))
    cfg = hf.config
    torch.testing.assert_close(paged_logits(model, cfg, seqs_for(cfg)),
                               reference_logits(hf, seqs_for(cfg)), rtol=1e-4, atol=1e-4)

    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(4, 20))] for _ in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    want = []
    with torch.inference_mode():
        for p in prompts:
            ids = list(p)
            for _ in range(8):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            want.append(ids[len(p):])
    assert got == want


class ExpertsOnly(QuantizationConfig):
    """Quantize only the experts (Linear layers stay float32), to test them alone."""

    def __init__(self, method):
        self.method = method

    def get_quant_method(self, layer, prefix):
        return UnquantizedMethod()

    def get_moe_method(self, layer, prefix):
        return self.method


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_stacked_experts_quantized_match_the_oracle(tiny_moe, scheme):
    """transformers 5's stacked expert tensors loaded whole into W8A16 / W4A16 experts."""
    method, quantize, ratio = {
        "w8a16": (W8A16FusedMoEMethod(), rtn_int8, (0.25, 0.3)),
        "w4a16": (W4A16FusedMoEMethod(32), rtn_int4, (0.125, 0.2)),
    }[scheme]
    # the family's config, 64 wide so that groups of 32 divide every expert's inputs
    cfg = AutoConfig.from_pretrained(str(tiny_moe), hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.08) if p.dim() >= 2 else p.normal_(1.0, 0.1)
    ours = resolve_model_class(cfg)(cfg, torch.float32, ReferenceAttentionBackend(),
                                    quant_config=ExpertsOnly(method))
    ours.load_weights(hf.state_dict().items())
    held, float32 = expert_bytes(ours)
    assert ratio[0] <= held / float32 < ratio[1]

    with torch.no_grad():
        for name, p in hf.named_parameters():
            if is_expert(name):
                p.copy_(quantize(p))
    torch.testing.assert_close(paged_logits(ours, cfg, seqs_for(cfg)),
                               reference_logits(hf, seqs_for(cfg)), rtol=1e-4, atol=1e-4)


def test_what_is_refused_says_what_to_do(tiny_moe):
    with pytest.raises(ConfigError, match="w8a8.*experts.*quantization='w8a16'"):
        LLM(str(tiny_moe), dtype="float32", quantization="w8a8")
    with pytest.raises(ConfigError, match="groups of 32 do not divide the experts' input size 48"):
        FusedMoE(4, 2, 48, 64, True, prefix="layer.experts", quant_config=RTNConfig("w4a16", 32))


def test_quantized_expert_tensors_in_a_checkpoint_are_refused():
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                        architectures=["MixtralForCausalLM"])
    ours = resolve_model_class(cfg)(cfg, torch.float32)
    packed = ("model.layers.0.block_sparse_moe.experts.0.w1.weight_packed",
              torch.zeros(32, 4, dtype=torch.int32))
    with pytest.raises(UnsupportedModelError, match="quantization='w8a16'"):
        ours.load_weights([packed])
