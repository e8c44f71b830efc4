"""Mixture-of-Experts GGUF files (Mixtral as llama.cpp's "llama" with experts, qwen2moe, qwen3moe)
against transformers on the original weights: tiny random models written here the way llama.cpp's
converter writes them (experts stacked per projection into ffn_{gate,up,down}_exps, gguf's own
name table, Llama q/k rows permuted, size-1 dims squeezed), in F32 and with Q8_0 experts (gguf's
own quantizer; the oracle then runs transformers on gguf's dequantization of the same blocks)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from soarllm import LLM, SamplingParams
from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.kernels.attention import ReferenceAttentionBackend
from soarllm.model.loader import load_checkpoint
from tests.model.test_logits_vs_hf import PagedRun
from tests.tiny import gguf_header, gguf_tokenizer, gguf_write, make_tiny_model

ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
FAMILIES = {
    "mixtral": {},
    # llama.cpp's qwen2moe never renormalises the k router weights, its qwen3moe always does
    "qwen2_moe": {"norm_topk_prob": False},
    "qwen3_moe": {"head_dim": 32, "norm_topk_prob": True},
}
# llama.cpp's converter: per layer, the experts' tensors of each projection stacked [E, ...]
# under one name its table maps (Mixtral: "layers.N.feed_forward.experts.w1")
EXPERT = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SOARLLM_HOME", str(tmp_path / "home"))


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's half-split rope rows made pair-adjacent."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _checkpoint_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """The tensors as transformers saved them (per-expert names), as llama.cpp reads them."""
    from safetensors.numpy import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def _gguf_tensors(hf_dir: Path, cfg) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, as llama.cpp's converter names, stacks and permutes them."""
    import gguf

    arch = ARCH[cfg.model_type]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    stacks: dict[str, dict[int, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    for name, data in _checkpoint_tensors(hf_dir).items():
        data = data.astype(np.float32)
        expert = EXPERT.match(name)
        if expert is not None:
            layer, block, index, proj = expert.groups()
            merged = (f"layers.{layer}.feed_forward.experts.{proj}.weight" if arch == "llama"
                      else f"model.layers.{layer}.{block}.experts.{proj}.weight")
            stacks.setdefault(merged, {})[int(index)] = data
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute_like_llama_cpp(data, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute_like_llama_cpp(data, cfg.num_key_value_heads)
        out[name_map.get_name(name, try_suffixes=(".weight", ".bias"))] = data.squeeze()
    for merged, experts in stacks.items():
        stacked = np.stack([experts[e] for e in range(len(experts))])
        out[name_map.get_name(merged, try_suffixes=(".weight",))] = stacked
    return out


def write_moe_gguf(hf_dir: Path, out: Path, expert_type: str = "F32") -> Path:
    """A GGUF of a tiny MoE model written like llama.cpp's converter (metadata keys included),
    the expert stacks in `expert_type` (F32 or a type gguf.quants can quantize)."""
    import gguf

    cfg = AutoConfig.from_pretrained(str(hf_dir))
    arch = ARCH[cfg.model_type]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name("tiny-moe")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gguf_header(writer, cfg, head_dim)
    if getattr(cfg, "head_dim", None):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_expert_count(cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch != "llama":
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    _add_tokenizer(writer, hf_dir)
    for name, data in _gguf_tensors(hf_dir, cfg).items():
        if expert_type != "F32" and name.endswith("_exps.weight"):
            qtype = gguf.GGMLQuantizationType[expert_type]
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    gguf_write(writer)
    return out


def _add_tokenizer(writer, hf_dir: Path) -> None:
    """The tiny model's byte-level BPE as a gpt2 GGUF vocabulary (what llama.cpp writes)."""
    specials = gguf_tokenizer(writer, hf_dir)
    writer.add_pad_token_id(specials["<|endoftext|>"])
    writer.add_add_bos_token(False)


def _dequantized_reference(hf_dir: Path, gguf_path: Path):
    """transformers on the original weights, its expert stacks replaced by gguf's dequantization
    of the blocks in the file (the file's other tensors are F32: the original weights)."""
    import gguf
    from gguf.quants import dequantize

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    stored = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            experts = layer.mlp.experts
            part = {p: torch.from_numpy(np.array(dequantize(stored[f"blk.{i}.ffn_{p}_exps.weight"].data,
                                                            stored[f"blk.{i}.ffn_{p}_exps.weight"].tensor_type),
                                                 dtype=np.float32))
                    for p in ("gate", "up", "down")}
            assert not torch.equal(part["down"], experts.down_proj), "the experts were not quantized"
            experts.gate_up_proj.copy_(torch.cat([part["gate"], part["up"]], dim=1))
            experts.down_proj.copy_(part["down"])
    return hf


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_moe_gguf(request, tmp_path_factory):
    family = request.param
    hf_dir = make_tiny_model(tmp_path_factory.mktemp(family), family, **FAMILIES[family])
    out = tmp_path_factory.mktemp("gguf")
    return (hf_dir, write_moe_gguf(hf_dir, out / f"{family}.gguf"),
            write_moe_gguf(hf_dir, out / f"{family}-q8.gguf", "Q8_0"))


def _paged_logits(model, cfg, seqs):
    run = PagedRun(model, cfg, seqs)
    run.step([(0, 0, 8), (1, 0, 12), (2, 0, 5)])
    return run.step([(0, 8, 1), (2, 5, 1), (1, 12, 9), (3, 0, 14)])


@pytest.mark.parametrize("expert_type", ["F32", "Q8_0"])
def test_gguf_logits_and_greedy_tokens_match_transformers(tiny_moe_gguf, expert_type):
    hf_dir, f32_path, q8_path = tiny_moe_gguf
    path = f32_path if expert_type == "F32" else q8_path
    hf = (AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
          if expert_type == "F32" else _dequantized_reference(hf_dir, path))
    cfg = hf.config

    llm = LLM(str(path), dtype="float32", block_size=4, max_num_seqs=8)
    assert type(llm.llm_engine.executor.runner.model).__name__ == cfg.architectures[0]
    _assert_same_as(llm, hf)


def _assert_same_as(llm, hf) -> None:
    """Mixed paged batches' last logits (1e-4) and greedy continuations of the engine `llm`
    equal transformers' model `hf`."""
    cfg = hf.config
    model = llm.llm_engine.executor.runner.model
    model.attn_backend = ReferenceAttentionBackend()
    seqs = [torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in (9, 21, 6, 14)]
    got = _paged_logits(model, cfg, seqs)
    with torch.inference_mode():
        want = torch.stack([hf(torch.tensor([seqs[r]])).logits[0, -1] for r in (0, 2, 1, 3)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(5, 30))] for _ in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == [
        _greedy(hf, p, 10) for p in prompts]


def _greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' argmax continuation, end-of-sequence tokens included (as ignore_eos)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_gguf_config_and_stacked_cache(tiny_moe_gguf):
    """The file's config reads back as transformers' config, and the conversion cache holds the
    experts stacked as transformers 5 holds them (the original weights, exactly)."""
    hf_dir, f32_path, _ = tiny_moe_gguf
    ckpt = load_checkpoint(str(f32_path))
    ref = AutoConfig.from_pretrained(str(hf_dir))
    for key in ("num_experts", "num_experts_per_tok", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_key_value_heads", "moe_intermediate_size",
                "shared_expert_intermediate_size", "norm_topk_prob", "qkv_bias"):
        assert getattr(ckpt.config, key, None) == getattr(ref, key, None), key
    head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert ckpt.config.head_dim == head_dim
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    ours = dict(ckpt.weights(torch.float32))
    prefix = "model.layers.1.block_sparse_moe" if ref.model_type == "mixtral" else "model.layers.1.mlp"
    for proj in ("gate_up_proj", "down_proj"):
        assert torch.equal(ours[f"{prefix}.experts.{proj}"],
                           getattr(hf.model.layers[1].mlp.experts, proj)), proj


def _write_with(tmp_path: Path, hf_dir: Path, **metadata) -> Path:
    """The tiny file with some metadata keys overridden (gguf's writer has no delete)."""
    import gguf

    out = tmp_path / "edited.gguf"
    write_moe_gguf(hf_dir, out)
    reader = gguf.GGUFReader(out)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), metadata.pop("arch", arch))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        key = key.replace(f"{arch}.", f"{writer.arch}.")
        if key in metadata:
            continue
        writer.add_key_value(key, field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for key, (value, vtype) in metadata.items():
        writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    gguf_write(writer)
    return tmp_path / "bad.gguf"


def test_unknown_or_unsupported_moe_gguf_is_a_clear_error(tmp_path):
    import gguf

    hf_dir = make_tiny_model(tmp_path / "hf", "qwen3_moe", **FAMILIES["qwen3_moe"])
    unknown = _write_with(tmp_path, hf_dir, arch="olmoe")
    with pytest.raises(UnsupportedModelError, match="Mixture-of-Experts architecture 'olmoe'.*"
                                                    "qwen3moe.*original HF checkpoint"):
        load_checkpoint(str(unknown))
    sigmoid = _write_with(tmp_path, hf_dir, **{
        "qwen3moe.expert_gating_func": (gguf.ExpertGatingFuncType.SIGMOID.value,
                                        gguf.GGUFValueType.UINT32)})
    with pytest.raises(UnsupportedModelError, match="sigmoid"):
        load_checkpoint(str(sigmoid))
    too_many = _write_with(tmp_path, hf_dir, **{
        "qwen3moe.expert_used_count": (9, gguf.GGUFValueType.UINT32)})
    with pytest.raises(ConfigError, match="expert_used_count <= expert_count"):
        load_checkpoint(str(too_many))


def test_gguf_experts_quantized_at_load(tmp_path):
    """quantization="w8a16" on a GGUF MoE file: its (dequantized) stacked experts load whole
    into int8 experts, the routers stay float."""
    from soarllm.model.layers.fused_moe import FusedMoE

    hf_dir = make_tiny_model(tmp_path / "hf", "qwen2_moe", **FAMILIES["qwen2_moe"])
    path = write_moe_gguf(hf_dir, tmp_path / "qwen2moe-q8.gguf", "Q8_0")
    llm = LLM(str(path), dtype="float32", quantization="w8a16", block_size=4)
    model = llm.llm_engine.executor.runner.model
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(m.gate_up_proj.dtype == m.down_proj.dtype == torch.int8 for m in experts)
    assert all(m.gate.weight.dtype == torch.float32 for m in model.modules() if hasattr(m, "experts"))
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("expert_type", ["Q4_0", "Q4_1"])
def test_gguf_int4_experts_are_served_in_their_blocks(tmp_path, expert_type):
    """Stacked experts of a 4-bit type load as W4A16 experts repacked from the file's blocks
    (not dequantized to the model dtype): a quarter of the bytes, and the same logits and
    greedy tokens as transformers on gguf's dequantization of those blocks."""
    from soarllm.model.layers.fused_moe import FusedMoE
    from soarllm.quant.moe import W4A16FusedMoEMethod

    hf_dir = make_tiny_model(tmp_path / "hf", "qwen2_moe", **FAMILIES["qwen2_moe"])
    path = write_moe_gguf(hf_dir, tmp_path / f"qwen2moe-{expert_type}.gguf", expert_type)
    hf = _dequantized_reference(hf_dir, path)
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_seqs=8)
    model = llm.llm_engine.executor.runner.model
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert len(experts) == hf.config.num_hidden_layers
    for m in experts:
        assert isinstance(m.quant_method, W4A16FusedMoEMethod)
        assert m.gate_up_proj.dtype == m.down_proj.dtype == torch.uint8
    _assert_same_as(llm, hf)
