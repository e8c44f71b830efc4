"""GGUF served quantized. Oracles we did not write: gguf's own dequantize (the repacked blocks must
give back the weights it gives, to float rounding) and transformers' model read from the same GGUF
file (which dequantizes it with gguf) for the logits of a tiny model whose layers are Q4_0, Q4_1
and Q8_0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from soarllm.kernels.attention import ReferenceAttentionBackend
from soarllm.model.layers.linear import Linear, MergedLinear
from soarllm.model.loader import load_checkpoint
from soarllm.model.models.base import DecoderForCausalLM
from soarllm.model.registry import resolve_model_class
from soarllm.quant.base import UnquantizedMethod
from soarllm.quant.config import get_quant_config
from soarllm.quant.gguf import GGUFBlocks, GGUFQuantConfig, Q8AsInt4PairMethod
from soarllm.quant.w4a16 import W4A16Method
from tests.model.test_logits_vs_hf import PagedRun
from tests.tiny import gguf_header, gguf_tokenizer, gguf_write, make_tiny_model


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SOARLLM_HOME", str(tmp_path / "home"))


def _quantized(weight: np.ndarray, qtype: str) -> GGUFBlocks:
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    blocks = gguf.quants.quantize(weight.astype(np.float32), t)
    return GGUFBlocks(qtype, torch.from_numpy(blocks), weight.shape)


def _random_q4_k(rows: int, cols: int, seed: int) -> GGUFBlocks:
    """Q4_K blocks with random nibbles, 6-bit scales/mins and fp16 super-block scales (gguf has
    no Q4_K quantizer): 144 bytes per 256 weights, d and dmin first."""
    rng = np.random.default_rng(seed)
    n = rows * cols // 256
    blocks = rng.integers(0, 256, size=(n, 144), dtype=np.uint8)
    d = rng.uniform(1e-3, 2e-2, size=n).astype(np.float16)
    dmin = rng.uniform(1e-3, 2e-2, size=n).astype(np.float16)
    blocks[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    blocks[:, 2:4] = dmin.view(np.uint8).reshape(n, 2)
    return GGUFBlocks("Q4_K", torch.from_numpy(blocks.reshape(rows, -1)), (rows, cols))


def _tinygemm(q, scale, zero) -> torch.Tensor:
    """w = (q - 8) * scale + zero per group of 32, written out here."""
    s = scale.repeat_interleave(32, dim=1)
    z = zero.repeat_interleave(32, dim=1)
    return (q.float() - 8) * s + z


def _gguf_dequantize(blocks: GGUFBlocks) -> torch.Tensor:
    import gguf

    values = gguf.quants.dequantize(blocks.data.numpy(), gguf.GGMLQuantizationType[blocks.qtype])
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(blocks.shape)


def _assert_float_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    # (q - 8) s + (m + 8 s) against q s + m: a few float32 ulps of the largest term
    torch.testing.assert_close(got, want, rtol=1e-6, atol=4e-7 * want.abs().max().item())


def _random_4bit_blocks(qtype: str, shape: tuple[int, int]) -> GGUFBlocks:
    rows, cols = shape
    if qtype == "Q4_K":
        return _random_q4_k(rows, cols, seed=rows)
    rng = np.random.default_rng(rows)
    return _quantized(rng.normal(0.0, 0.05, size=shape) + rng.normal(0, 0.02), qtype)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("shape", [(48, 256), (7, 512)])
def test_repack_on_the_vnni_layout_equals_gguf_dequantize(qtype, shape):
    """GGUF's 4-bit layers as they are built by default on an AVX-512 VNNI or AVX2 CPU: the weight the
    VNNI layout holds (float16 scale and min per 32 inputs) is gguf's dequantized weight to
    float16 rounding of the scales."""
    from soarllm.quant import vnni

    if vnni.kernels() is None:
        pytest.skip("neither AVX-512 VNNI nor AVX2 here (or no C compiler)")
    rows, cols = shape
    blocks = _random_4bit_blocks(qtype, shape)
    layer = Linear(cols, rows, dtype=torch.bfloat16,
                   quant_method=W4A16Method(32, int8_activations=True))
    layer.qweight.weight_loader(layer.qweight, blocks)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.cpu_layout == "vnni4"
    want = _gguf_dequantize(blocks)
    torch.testing.assert_close(layer.quant_method.dequantized_weight(layer), want, rtol=2**-10,
                               atol=2**-11 * want.abs().max().item())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("shape", [(48, 256), (7, 512)])
def test_repack_equals_gguf_dequantize(qtype, shape):
    rows, cols = shape
    blocks = _random_4bit_blocks(qtype, shape)
    q, scale, zero = blocks.to_int4()
    assert q.shape == shape and int(q.max()) <= 15 and scale.shape == (rows, cols // 32)
    _assert_float_rounding(_tinygemm(q, scale, zero), _gguf_dequantize(blocks))
    # Through the layer: the weight the CPU kernel computes with, as bfloat16. The native layout
    # keeps GGUF's float16 scales (so: gguf's own dequantization); PyTorch's int4 kernel rounds
    # scales and zeros to bfloat16 (its dtype).
    layer = Linear(cols, rows, dtype=torch.float32, quant_method=W4A16Method(32))
    layer.qweight.weight_loader(layer.qweight, blocks)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.use_cpu_kernel
    bf16 = torch.bfloat16
    if layer.cpu_layout == "soar4":
        # Q4_K's scales (6-bit sub-scale x float16) are rounded to float16 first: one bfloat16
        # step of difference, not two
        seen, rtol = _gguf_dequantize(blocks), 2**-7
    else:
        seen, rtol = _tinygemm(q, scale.to(bf16).float(), zero.to(bf16).float()), 2**-8
    torch.testing.assert_close(layer.quant_method.dequantized_weight(layer), seen.to(bf16).float(),
                               rtol=rtol, atol=2**-9 * seen.abs().max().item())


@pytest.mark.parametrize("shape", [(48, 256), (7, 512)])
def test_q8_0_as_two_int4_planes_equals_gguf_dequantize(shape):
    rows, cols = shape
    rng = np.random.default_rng(rows)
    blocks = _quantized(rng.normal(0.0, 0.05, size=shape), "Q8_0")
    q, scale, zero = blocks.to_int4_planes()
    assert q.shape == (rows, 2 * cols) and int(q.max()) <= 15
    planes = _tinygemm(q, scale, zero)
    _assert_float_rounding(planes[:, :cols] + planes[:, cols:], _gguf_dequantize(blocks))
    # Through the layer on the CPU kernel (bfloat16 scales and zeros): against x @ w.T with the
    # weight as gguf dequantizes it
    layer = Linear(cols, rows, dtype=torch.float32, quant_method=Q8AsInt4PairMethod(32))
    layer.qweight.weight_loader(layer.qweight, blocks)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.use_cpu_kernel
    want = _gguf_dequantize(blocks)
    got = layer.quant_method.dequantized_weight(layer)
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-8 * want.abs().max().item())
    x = torch.randn(5, cols)
    ref = x.double() @ want.double().t()
    torch.testing.assert_close(layer(x).double(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


@pytest.mark.parametrize("shape", [(48, 256), (7, 512), (100, 96)])
def test_q8_0_on_the_vnni_kernel_equals_gguf_dequantize(shape):
    """A Q8_0 layer kept as its bytes (AVX-512 VNNI or AVX2): the weight it holds is gguf's dequantized
    weight exactly, and its output is x @ w.T with x rounded to int8 per 32 inputs (llama.cpp's
    Q8_0 x Q8_0), close to the float product."""
    from soarllm.quant import vnni
    from soarllm.quant.gguf import Q8VnniMethod

    if vnni.kernels() is None:
        pytest.skip("neither AVX-512 VNNI nor AVX2 here (or no C compiler): Q8_0 layers take two "
                    "int4 planes")
    rows, cols = shape
    rng = np.random.default_rng(rows)
    blocks = _quantized(rng.normal(0.0, 0.05, size=shape), "Q8_0")
    layer = Linear(cols, rows, dtype=torch.bfloat16, quant_method=Q8VnniMethod())
    layer.qweight.weight_loader(layer.qweight, blocks)
    layer.quant_method.process_weights_after_loading(layer)
    want = _gguf_dequantize(blocks)
    torch.testing.assert_close(layer.quant_method.dequantized_weight(layer), want, rtol=0, atol=0)
    x = torch.randn(9, cols).to(torch.bfloat16)
    xf = x.float().view(9, cols // 32, 32)
    step = xf.abs().amax(-1, keepdim=True) / 127
    xq = (torch.round(xf / step) * step).view(9, cols)  # the activations the int8 values stand for
    got = layer(x).double()
    ref = xq.double() @ want.double().t()
    torch.testing.assert_close(got, ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())
    exact = x.double() @ want.double().t()
    torch.testing.assert_close(got, exact, rtol=0.03, atol=0.03 * exact.abs().max().item())


def test_gguf_layers_built_for_another_device_keep_their_kernels():
    """The VNNI kernels are for a model on the CPU: layers built under another device (the
    runner builds under its own; ``meta`` stands in for CUDA here) keep the two int4 planes and
    bfloat16 activations, and the summary does not claim int8 activations."""
    types = {"model.layers.0.mlp.down_proj.weight": "Q8_0",
             "model.layers.0.self_attn.o_proj.weight": "Q4_1"}
    config = GGUFQuantConfig(types, DecoderForCausalLM.packed_modules, tie_word_embeddings=False)
    with torch.device("meta"):
        down = Linear(128, 64, dtype=torch.bfloat16, quant_config=config,
                      prefix="model.layers.0.mlp.down_proj")
        o = Linear(64, 64, dtype=torch.bfloat16, quant_config=config,
                   prefix="model.layers.0.self_attn.o_proj")
    assert isinstance(down.quant_method, Q8AsInt4PairMethod)
    assert not down.quant_method.int8_activations and not o.quant_method.int8_activations
    assert "int8 activations" not in config.summary()


def test_gguf_config_per_layer_types():
    """W4A16 where every shard of a layer is a 4-bit type, the two-plane form where every shard is
    Q8_0; other types are dequantized."""
    types = {
        "model.layers.0.self_attn.q_proj.weight": "Q4_0",
        "model.layers.0.self_attn.k_proj.weight": "Q4_K",
        "model.layers.0.self_attn.v_proj.weight": "Q4_1",
        "model.layers.0.mlp.gate_proj.weight": "Q4_1",
        "model.layers.0.mlp.up_proj.weight": "Q6_K",
        "model.layers.0.mlp.down_proj.weight": "Q8_0",
        "model.embed_tokens.weight": "Q4_0",
    }
    config = GGUFQuantConfig(types, DecoderForCausalLM.packed_modules, tie_word_embeddings=True)
    qkv = MergedLinear(64, {"q": 64, "k": 32, "v": 32}, quant_config=config,
                       prefix="model.layers.0.self_attn.qkv_proj")
    gate_up = MergedLinear(64, {"gate": 128, "up": 128}, quant_config=config,
                           prefix="model.layers.0.mlp.gate_up_proj")
    down = Linear(128, 64, dtype=torch.bfloat16, quant_config=config,
                  prefix="model.layers.0.mlp.down_proj")
    norm_like = Linear(64, 64, quant_config=config, prefix="model.layers.0.other")  # F32
    head = Linear(64, 512, quant_config=config, prefix="lm_head")  # tied: the embedding's type
    assert isinstance(qkv.quant_method, W4A16Method)
    assert isinstance(head.quant_method, W4A16Method)
    from soarllm.quant.gguf import Q8VnniMethod
    from soarllm.quant.w4a16 import int8_activations_by_default

    assert isinstance(down.quant_method,
                      Q8VnniMethod if int8_activations_by_default() else Q8AsInt4PairMethod)
    for layer in (gate_up, norm_like):
        assert isinstance(layer.quant_method, UnquantizedMethod)
    summary = config.summary()
    # in a float32 model a Q8_0 layer takes int8 activations where the 4-bit layers do (llama.cpp's
    # arithmetic, as theirs); elsewhere it stays exact: the int4 planes would round its activations
    # to bfloat16
    down32 = Linear(128, 64, quant_config=config, prefix="model.layers.0.mlp.down_proj")
    assert isinstance(down32.quant_method,
                      Q8VnniMethod if int8_activations_by_default() else UnquantizedMethod)
    assert "repacked exactly (group 32): 2 Q4_0, 1 Q4_1, 1 Q4_K, 1 Q8_0" in summary  # qkv, head, down
    assert "1 Q4_1, 1 Q6_K" in summary  # gate shares its layer with a Q6_K shard


# --- a tiny model written as GGUF with 4-bit and 8-bit tensors ---------------------------------

# which GGML type each HF weight is written in; everything else (norms) F32
TYPES = {
    "self_attn.q_proj.weight": "Q4_0",
    "self_attn.k_proj.weight": "Q4_1",
    "self_attn.v_proj.weight": "Q4_1",
    "self_attn.o_proj.weight": "Q4_0",
    "mlp.gate_proj.weight": "Q4_1",
    "mlp.up_proj.weight": "Q4_1",
    "mlp.down_proj.weight": "Q8_0",
    "model.embed_tokens.weight": "Q4_0",  # tied: the head is served from a W4A16 copy
    "lm_head.weight": "Q4_1",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (LlamaModel.permute in its converter)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf_dir: Path, out: Path) -> Path:
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(hf_dir))
    state = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    arch = cfg.model_type
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(out), arch)
    gguf_header(w, cfg)
    gguf_tokenizer(w, hf_dir)
    for hf_name, tensor in state.items():
        data = tensor.numpy()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        qtype = next((t for suffix, t in TYPES.items() if hf_name.endswith(suffix)), None)
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(data))
        else:
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(data, t), raw_dtype=t)
    gguf_write(w)
    return out


@pytest.fixture(scope="module", params=["llama-tied", "qwen2-untied"])
def tiny_gguf(request, tmp_path_factory) -> Path:
    arch, tying = request.param.split("-")
    hf_dir = make_tiny_model(tmp_path_factory.mktemp(arch), arch, tie_word_embeddings=tying == "tied")
    return _write_gguf(hf_dir, tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf")


def _build(path: Path, quantization: str | None, dtype: torch.dtype = torch.float32):
    ckpt = load_checkpoint(str(path))
    cls = resolve_model_class(ckpt.config)
    qc = get_quant_config(quantization, ckpt, cls.packed_modules)
    model = cls(ckpt.config, dtype, ReferenceAttentionBackend(), quant_config=qc)
    model.load_weights(qc.weights(ckpt, dtype) if qc else ckpt.weights(dtype))
    return model, ckpt.config


def _logits(model, cfg, seqs) -> torch.Tensor:
    run = PagedRun(model, cfg, seqs)
    return run.step([(i, 0, len(s)) for i, s in enumerate(seqs)])


def _hf_last_logits(path: Path, seqs: list[list[int]]) -> torch.Tensor:
    """transformers' float32 model read from the same GGUF file: each sequence's last logits."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.stack([ref(torch.tensor([s])).logits[0, -1] for s in seqs])


@pytest.mark.parametrize("layout", ["torch", "auto"])
def test_tiny_gguf_served_quantized_matches_transformers(tiny_gguf, layout, monkeypatch):
    """``torch``: the int4 kernel sees bfloat16 activations; ``auto``: where the CPU has AVX-512
    VNNI or AVX2, int8 activations per 32 inputs (llama.cpp's arithmetic; the Q8_0 down_proj too),
    a looser but still close match."""
    from soarllm.quant.w4a16 import int8_activations_by_default

    monkeypatch.setenv("SOARLLM_W4A16_CPU", layout)
    int8 = int8_activations_by_default()
    model, cfg = _build(tiny_gguf, None)
    kinds = {type(m.quant_method).__name__ for m in model.modules() if isinstance(m, Linear)}
    # float32: the Q8_0 down_proj dequantized, unless it takes int8 activations as the rest
    assert kinds == {"W4A16Method", "Q8VnniMethod" if int8 else "UnquantizedMethod"}
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.quant_method, W4A16Method)
    assert isinstance(model.lm_head.quant_method, W4A16Method)  # Q4_0 embedding or Q4_1 output
    assert all(m.use_cpu_kernel for m in model.modules() if isinstance(m.__dict__.get("quant_method"), W4A16Method))

    torch.manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (7, 12)]
    got = _logits(model, cfg, seqs)
    want = _hf_last_logits(tiny_gguf, seqs)
    assert {m.cpu_layout for m in model.modules() if getattr(m, "cpu_layout", None)} == (
        {"vnni4", "vnni8"} if int8 else {"int4pack"})
    # The same weights; the int4 kernel sees bfloat16 (or int8) activations, float16 or bfloat16
    # scales and zeros.
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    print(f"{layout}: cosine {cos.tolist()}, largest error "
          f"{((got - want).abs().max() / want.abs().max()).item():.4f} of the largest logit")
    assert bool((cos > (0.999 if int8 else 0.9999)).all()), cos
    assert (got - want).abs().max() < (0.04 if int8 else 0.02) * want.abs().max()
    if int8:  # the chosen token is transformers' best or within the error of it (random weights)
        picked = want.gather(-1, got.argmax(-1, keepdim=True))[:, 0]
        assert bool((want.max(-1).values - picked <= 0.04 * want.abs().max()).all())
    else:
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    dequantized, _ = _build(tiny_gguf, "none")
    assert not any(isinstance(m.__dict__.get("quant_method"), W4A16Method) for m in dequantized.modules())
    torch.testing.assert_close(_logits(dequantized, cfg, seqs), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["torch", "auto"])
def test_bfloat16_gguf_with_q8_0_layers_matches_transformers(tiny_gguf, layout, monkeypatch):
    """In a bfloat16 model the Q8_0 down_proj runs as two int4 planes (``torch``), or as int8
    bytes with int8 activations where the CPU has AVX-512 VNNI or AVX2 (``auto``): the logits stay those
    of transformers' float32 model on the same file, to that rounding."""
    from soarllm.quant.w4a16 import int8_activations_by_default

    monkeypatch.setenv("SOARLLM_W4A16_CPU", layout)
    model, cfg = _build(tiny_gguf, None, torch.bfloat16)
    kinds = {type(m.quant_method).__name__ for m in model.modules() if isinstance(m, Linear)}
    assert ("Q8VnniMethod" if int8_activations_by_default() else "Q8AsInt4PairMethod") in kinds, kinds
    torch.manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (7, 12)]
    run = PagedRun(model, cfg, seqs)
    run.caches = [c.to(torch.bfloat16) for c in run.caches]
    got = run.step([(i, 0, len(s)) for i, s in enumerate(seqs)]).float()
    want = _hf_last_logits(tiny_gguf, seqs)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert bool((cos > 0.999).all()), cos


@pytest.mark.parametrize("layout", ["torch", "auto"])
def test_tied_quantized_head_serves_large_batches_from_the_dequantized_table(tiny_gguf, layout,
                                                                             monkeypatch):
    """Up to its method's limit (QUANTIZED_HEAD_MAX_ROWS for the int4 planes) the tied head's
    quantized copy computes the logits, above it the embedding table: both give the logits of
    the same weights. The Q8_0 head on the VNNI kernel (``auto`` where it runs) has no limit:
    every batch on the quantized copy, each row as it is alone."""
    from soarllm.model.models.base import QUANTIZED_HEAD_MAX_ROWS
    from soarllm.quant.gguf import Q8VnniMethod
    from soarllm.quant.w4a16 import int8_activations_by_default

    monkeypatch.setenv("SOARLLM_W4A16_CPU", layout)
    model, cfg = _build(tiny_gguf, None, torch.bfloat16)
    if not model.tie_word_embeddings:
        assert model.dense_head_weight is None
        return
    assert model.dense_head_weight is model.model.embed_tokens.weight
    vnni_head = isinstance(model.lm_head.quant_method, Q8VnniMethod)
    assert not vnni_head or int8_activations_by_default()
    torch.manual_seed(1)
    hidden = torch.randn(QUANTIZED_HEAD_MAX_ROWS + 3, cfg.hidden_size).bfloat16()
    with torch.inference_mode():
        large = model.compute_logits(hidden)  # the dequantized table (int4 planes)
        small = torch.cat([model.compute_logits(h[None]) for h in hidden])  # the quantized copy
        exact = hidden.double() @ model.dense_head_weight.double().t()
    torch.testing.assert_close(small.double(), exact, rtol=0.02,
                               atol=0.02 * exact.abs().max().item())
    if vnni_head:
        assert torch.equal(large, small)
    else:
        torch.testing.assert_close(large.double(), exact, rtol=2**-7,
                                   atol=2**-7 * exact.abs().max().item())


def test_quantization_gguf_refused_for_other_checkpoints(tmp_path):
    from soarllm.errors import ConfigError

    hf_dir = make_tiny_model(tmp_path / "m", "llama")
    ckpt = load_checkpoint(str(hf_dir))
    with pytest.raises(ConfigError, match="needs a .gguf checkpoint"):
        get_quant_config("gguf", ckpt, DecoderForCausalLM.packed_modules)
    assert get_quant_config(None, ckpt, DecoderForCausalLM.packed_modules) is None


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_narrow_to_a_rank_slice_as_gguf_dequantizes_it(qtype):
    """A tensor-parallel rank's slice of stored blocks, still blocks: rows (past the end: zero
    weights, a padded vocabulary), block-aligned columns, stacked experts; gguf's own
    dequantization of the slice = the slice of its dequantization of the whole."""
    import gguf

    from soarllm.quant.gguf import GGUFBlocks

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 6, 96)).astype(np.float32)  # experts, rows, 3 blocks of 32
    qt = gguf.GGMLQuantizationType[qtype]
    stacked = GGUFBlocks(qtype, torch.from_numpy(gguf.quants.quantize(w, qt)), (3, 6, 96))
    full = stacked.dequantize()
    flat = GGUFBlocks(qtype, stacked.data[1], (6, 96))
    assert torch.equal(flat.narrow(0, 2, 3).dequantize(), full[1, 2:5])
    padded = flat.narrow(0, 4, 4).dequantize()  # rows 4, 5 and two of zeros
    assert torch.equal(padded[:2], full[1, 4:]) and not padded[2:].any()
    assert torch.equal(flat.narrow(1, 32, 64).dequantize(), full[1, :, 32:])
    assert flat.narrow(1, 16, 32) is None and flat.narrow(1, 64, 64) is None  # not whole blocks
    assert torch.equal(stacked.narrow(0, 1, 2).dequantize(), full[1:])
    assert torch.equal(stacked.narrow(-1, 0, 32).dequantize(), full[..., :32])
    both = GGUFBlocks.concat([stacked.narrow(1, 0, 2), stacked.narrow(1, 4, 2)], dim=1)
    assert torch.equal(both.dequantize(), torch.cat([full[:, :2], full[:, 4:]], dim=1))
