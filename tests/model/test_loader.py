"""load_checkpoint against transformers: the tensors and config transformers saved (HF directories)
or reads itself (GGUF), for tiny random models and, marked `model`, the real default model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from soarllm.errors import ConfigError, ModelNotFoundError
from soarllm.model.loader import load_checkpoint
from soarllm.model.tokenizer import fim_tokens, load_tokenizer
from tests.hf_reference import hf_gguf
from tests.tiny import gguf_header, gguf_tokenizer, gguf_write, make_tiny_model


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch, request):
    """Conversion caches of tiny models go to a per-test SOARLLM_HOME; model tests keep the
    session's so the default model's cache is built once."""
    if "default_model_path" not in request.fixturenames:
        monkeypatch.setenv("SOARLLM_HOME", str(tmp_path / "home"))


def hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def assert_same_tensors(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(ref)
    for name, tensor in ref.items():
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def tiny_qwen2_tied(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tie_word_embeddings=True)


# --- Hugging Face directories -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2_tied"])
def test_safetensors_dir_matches_transformers(family, request):
    directory = request.getfixturevalue(family)
    ckpt = load_checkpoint(str(directory))
    assert ckpt.format == "safetensors"
    assert ckpt.path == directory.resolve()
    assert ckpt.tokenizer_dir == directory.resolve()
    ref = hf_state_dict(directory)
    assert_same_tensors(dict(ckpt.weights(torch.float32)), ref)
    from transformers import AutoConfig

    assert ckpt.config.to_dict() == AutoConfig.from_pretrained(str(directory)).to_dict()
    assert ckpt.config.architectures == [f"{ckpt.config.model_type.capitalize()}ForCausalLM"]


def test_sharded_safetensors(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt.tokenizer_dir is None  # no tokenizer files saved here
    assert_same_tensors(dict(ckpt.weights(torch.float32)), hf_state_dict(tiny_llama))


def test_dtype_conversion(tiny_llama):
    ckpt = load_checkpoint(str(tiny_llama))
    ref = hf_state_dict(tiny_llama)
    for name, tensor in ckpt.weights(torch.bfloat16):
        assert tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu"
        assert torch.equal(tensor, ref[name].to(torch.bfloat16))


@pytest.mark.parametrize(
    "filename, wrap",
    [("pytorch_model.bin", False), ("model.pt", True)],
)
def test_torch_pickles(tiny_llama, tmp_path, filename, wrap):
    ref = hf_state_dict(tiny_llama)
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    torch.save({"state_dict": ref} if wrap else ref, tmp_path / filename)
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt.format == "pt"
    assert_same_tensors(dict(ckpt.weights(torch.float32)), ref)
    with pytest.raises(ConfigError, match="safetensors"):
        load_checkpoint(str(tmp_path), load_format="safetensors")


def test_pickle_with_code_is_refused(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    torch.save({"w": torch.zeros(2), "extra": Path("x")}, tmp_path / "pytorch_model.bin")
    ckpt = load_checkpoint(str(tmp_path))
    with pytest.raises(ConfigError, match="state_dict|tensors"):
        list(ckpt.weights(torch.float32))


def test_hf_overrides(tiny_llama):
    ckpt = load_checkpoint(str(tiny_llama), hf_overrides={"max_position_embeddings": 64})
    assert ckpt.config.max_position_embeddings == 64


def test_errors(tiny_llama, tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="config.json"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(ConfigError, match="load_format"):
        load_checkpoint(str(tiny_llama), load_format="onnx")
    with pytest.raises(ConfigError, match="gguf"):
        load_checkpoint(str(tiny_llama), load_format="gguf")
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(ConfigError, match="weights"):
        load_checkpoint(str(tmp_path))
    from transformers import LlamaConfig

    with pytest.raises(ConfigError, match="dummy"):
        load_checkpoint(LlamaConfig())


# --- dummy weights ----------------------------------------------------------------------------


def test_dummy_shapes_without_reading_weights(tiny_llama, tmp_path):
    for file in tiny_llama.iterdir():
        target = tmp_path / file.name
        if file.suffix == ".safetensors":
            target.write_bytes(b"not a weight file")  # reading it would fail
        else:
            target.write_bytes(file.read_bytes())
    ckpt = load_checkpoint(str(tmp_path), load_format="dummy")
    assert ckpt.format == "dummy" and ckpt.tokenizer_dir == tmp_path.resolve()
    ref = hf_state_dict(tiny_llama)
    ours = dict(ckpt.weights(torch.float16))
    assert {n: t.shape for n, t in ours.items()} == {n: t.shape for n, t in ref.items()}
    assert all(t.dtype == torch.float16 for t in ours.values())
    assert torch.equal(ours["model.norm.weight"], torch.ones(64, dtype=torch.float16))
    embed = ours["model.embed_tokens.weight"].float()
    assert abs(embed.std().item() - 0.02) < 0.002 and abs(embed.mean().item()) < 0.002
    again = dict(load_checkpoint(str(tmp_path), load_format="dummy").weights(torch.float16))
    assert all(torch.equal(ours[n], again[n]) for n in ours)  # fixed seed


def test_dummy_from_config_json_and_object(tiny_llama):
    from transformers import Qwen2Config

    by_file = load_checkpoint(str(tiny_llama / "config.json"), load_format="dummy")
    assert by_file.config.hidden_size == 64
    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )  # fmt: skip
    ckpt = load_checkpoint(config, load_format="dummy", hf_overrides={"num_hidden_layers": 1})
    assert ckpt.config.architectures == ["Qwen2ForCausalLM"]
    assert config.num_hidden_layers == 3  # the caller's config is left alone
    names = dict(ckpt.weights(torch.float32))
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert not any(n.startswith("model.layers.1.") for n in names)


def test_dummy_is_lazy_for_huge_configs():
    from transformers import LlamaConfig

    # ~33B parameters (66 GB in bfloat16, more than this machine has): only what is asked is made.
    config = LlamaConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=2000, num_attention_heads=8,
        vocab_size=1000,
    )  # fmt: skip
    ckpt = load_checkpoint(config, load_format="dummy")
    first = list(itertools.islice(ckpt.weights(torch.bfloat16), 2))
    assert [(name, tuple(t.shape)) for name, t in first] == [
        ("model.embed_tokens.weight", (1000, 1024)),
        ("model.layers.0.self_attn.q_proj.weight", (1024, 1024)),
    ]


# --- GGUF, tiny: written here, read back by transformers (the oracle) and by us -----------------


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF half-split rope rows -> interleaved."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(hf_dir: Path, out: Path) -> Path:
    """A GGUF of a tiny llama or qwen2 written the way llama.cpp's converter does: gguf's own name
    table, q/k permuted (llama only), a gpt2 BPE tokenizer, and one Q8_0-quantized tensor."""
    import gguf
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(hf_dir))
    state = hf_state_dict(hf_dir)
    arch = cfg.model_type
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    name_map = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name("tiny")
    gguf_header(writer, cfg)
    specials = gguf_tokenizer(writer, hf_dir)
    writer.add_pad_token_id(specials["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        json.loads((hf_dir / "tokenizer_config.json").read_text()).get("chat_template")
        or (hf_dir / "chat_template.jinja").read_text()
    )
    for hf_name, tensor in state.items():
        data = tensor.numpy()
        if arch != "llama":
            pass
        elif hf_name.endswith("q_proj.weight"):
            data = permute_like_llama_cpp(data, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_like_llama_cpp(data, cfg.num_key_value_heads)
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if hf_name == "model.layers.0.mlp.down_proj.weight":
            quant = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    gguf_write(writer)
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def tiny_qwen2_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """An untied qwen2 (q/k/v biases, output.weight present)."""
    hf_dir = make_tiny_model(tmp_path_factory.mktemp("qwen2-untied"), "qwen2")
    return hf_dir, write_tiny_gguf(hf_dir, tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_gguf_matches_transformers(family, request):
    from transformers import AutoModelForCausalLM

    if family == "llama":
        hf_dir, gguf_path = (
            request.getfixturevalue("tiny_llama"),
            request.getfixturevalue("tiny_gguf"),
        )
    else:
        hf_dir, gguf_path = request.getfixturevalue("tiny_qwen2_gguf")
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
    ref = ref_model.state_dict()
    if ref_model.config.tie_word_embeddings:
        ref.pop("lm_head.weight")
    original = hf_state_dict(hf_dir)
    # the writer is right: transformers undoes its permutation back to the original weights
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        assert torch.equal(ref[name], original[name])

    ckpt = load_checkpoint(str(gguf_path))
    assert ckpt.format == "gguf" and ckpt.path == gguf_path.resolve()
    assert_same_tensors(dict(ckpt.weights(torch.float32)), ref)
    assert ckpt.config.architectures == [type(ref_model).__name__]
    assert ckpt.config.tie_word_embeddings is ref_model.config.tie_word_embeddings is False
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "bos_token_id",
                "eos_token_id", "tie_word_embeddings"):  # fmt: skip
        assert getattr(ckpt.config, key) == getattr(ref_model.config, key), key
    assert ckpt.config.rms_norm_eps == pytest.approx(ref_model.config.rms_norm_eps)
    assert (
        ckpt.config.rope_parameters["rope_theta"] == ref_model.config.rope_parameters["rope_theta"]
    )


def test_tiny_gguf_cache_is_reused_and_atomic(tiny_gguf, monkeypatch):
    import gguf

    from soarllm import hub

    first = load_checkpoint(str(tiny_gguf))
    cache = hub.cached_conversion(tiny_gguf)
    assert cache is not None and first.tokenizer_dir == cache
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".tmp-")]

    def no_reader(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    second = load_checkpoint(str(tiny_gguf))
    assert second.tokenizer_dir == cache
    assert_same_tensors(dict(second.weights(torch.float32)), dict(first.weights(torch.float32)))


def test_failed_conversion_leaves_no_cache(tiny_gguf, monkeypatch):
    from soarllm import hub
    from soarllm.model.loader import gguf_cache

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_cache, "_save_sharded", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        load_checkpoint(str(tiny_gguf))
    root = hub.converted_root()
    assert hub.cached_conversion(tiny_gguf) is None
    assert not list(root.iterdir())


def test_tiny_gguf_tokenizer_matches_transformers(tiny_gguf):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ours = load_tokenizer(load_checkpoint(str(tiny_gguf)))
    assert ours.is_fast
    for text in [
        "def f(x):\n    return x + 1",
        "import json, os",
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        assert ours.encode(text) == ref.encode(text)
    assert ours.chat_template == ref.chat_template is not None
    assert load_tokenizer(str(tiny_gguf)).encode("import os") == ref.encode("import os")


def test_dummy_from_gguf_reads_no_tensor(tiny_gguf, tiny_llama, monkeypatch):
    from soarllm import hub
    from soarllm.model.loader import gguf_tensors

    monkeypatch.setattr(gguf_tensors, "hf_tensors", None)  # any dequantization would fail
    ckpt = load_checkpoint(str(tiny_gguf), load_format="dummy")
    assert ckpt.format == "dummy" and ckpt.config.num_key_value_heads == 2
    assert hub.cached_conversion(tiny_gguf) is None
    ours = {name: t.shape for name, t in ckpt.weights(torch.float32)}
    assert ours == {name: t.shape for name, t in hf_state_dict(tiny_llama).items()}


def test_tokenizer_sources(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(tiny_llama))
    text = "for i in range(10):\n    print(i)"
    assert load_tokenizer(load_checkpoint(str(tiny_llama))).encode(text) == ref.encode(text)
    assert load_tokenizer(str(tiny_llama)).encode(text) == ref.encode(text)
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    bare = load_checkpoint(str(tmp_path), load_format="dummy")
    assert bare.tokenizer_dir is None
    with pytest.raises(ConfigError, match="tokenizer="):
        load_tokenizer(bare)
    assert load_tokenizer(bare, tokenizer=str(tiny_llama)).encode(text) == ref.encode(text)


# --- fill-in-the-middle tokens ----------------------------------------------------------------


class _Vocab:
    def __init__(self, tokens):
        self._vocab = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self):
        return self._vocab


def test_fim_tokens():
    assert fim_tokens(_Vocab(["a", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"])) == (
        "<fim_prefix>", "<fim_suffix>", "<fim_middle>",
    )  # fmt: skip
    qwen = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>"]
    assert fim_tokens(_Vocab(qwen)) == tuple(qwen[:3])
    assert fim_tokens(_Vocab(["<fim_prefix>", "<fim_middle>"])) is None


# --- the real default model (GGUF Q4_1) ---------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_gguf(default_model_path):
    tok, model = hf_gguf(default_model_path)
    return model, tok


@pytest.mark.model
def test_default_model_weights_and_config_match_transformers(default_model_path, transformers_gguf):
    model, _ = transformers_gguf
    ckpt = load_checkpoint(str(default_model_path))
    assert ckpt.format == "gguf"
    ref = model.state_dict()
    ref.pop("lm_head.weight")  # tied to the embeddings: the GGUF has no output.weight
    assert_same_tensors(dict(ckpt.weights(torch.float32)), ref)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings",
                "bos_token_id", "eos_token_id", "tie_word_embeddings"):  # fmt: skip
        assert getattr(ckpt.config, key) == getattr(model.config, key), key
    assert ckpt.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps)
    assert ckpt.config.rope_parameters == model.config.rope_parameters


@pytest.mark.model
def test_default_model_tokenizer_matches_transformers(default_model_path, transformers_gguf):
    _, ref = transformers_gguf
    ours = load_tokenizer(load_checkpoint(str(default_model_path)))
    texts = [
        "Hello, world!",
        "def fib(n):\n\treturn n if n < 2 else fib(n - 1) + fib(n - 2)  # ünïcödé 日本語",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "   leading spaces and trailing   ",
    ]
    for text in texts:
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))
    assert ours.chat_template == ref.chat_template and "<|im_start|>" in ours.chat_template
    chat = [{"role": "user", "content": "Hi!"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    assert fim_tokens(ours) is None  # SmolLM2's vocab has no FIM tokens


@pytest.mark.model
def test_default_model_second_load_uses_cache(default_model_path, monkeypatch):
    import gguf

    from soarllm.hub import cached_conversion, converted_root

    load_checkpoint(str(default_model_path))
    cache = cached_conversion(default_model_path)
    assert cache is not None and cache.parent == converted_root()
    assert (cache / "config.json").is_file() and (cache / "tokenizer.json").is_file()
    assert list(cache.glob("*.safetensors"))

    def no_reader(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    ckpt = load_checkpoint("smollm2-135m-instruct")
    assert ckpt.path == default_model_path and ckpt.tokenizer_dir == cache
    name, tensor = next(iter(ckpt.weights(torch.bfloat16)))
    assert tensor.dtype == torch.bfloat16


# --- Gemma 3 270M (GGUF Q4_K_M, gemma3 architecture) ---------------------------------------------


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    from soarllm import hub

    return hub.pull("gemma3-270m", progress=False)


@pytest.mark.model
@pytest.mark.slow
def test_gemma3_matches_transformers(gemma_path):
    ckpt = load_checkpoint(str(gemma_path))
    assert ckpt.config.architectures == ["Gemma3ForCausalLM"]
    tok_ref, model = hf_gguf(gemma_path)  # shared with tests/engine/test_gemma3_vs_transformers.py
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size", "sliding_window", "layer_types",
                "query_pre_attn_scalar", "rope_parameters", "tie_word_embeddings"):  # fmt: skip
        assert getattr(ckpt.config, key) == getattr(model.config, key), key
    ref = model.state_dict()
    ref.pop("lm_head.weight")
    assert_same_tensors(dict(ckpt.weights(torch.float32)), ref)  # norms shifted back by -1 too
    del model, ref

    ours = load_tokenizer(ckpt)
    for text in ["Hello, world!", "def f(x):\n    return x  # 日本語", "<start_of_turn>user\nhi"]:
        assert ours.encode(text) == tok_ref.encode(text)
    end_of_turn = ours.convert_tokens_to_ids("<end_of_turn>")
    assert ckpt.config.eos_token_id == [tok_ref.eos_token_id, end_of_turn]
    # the GGUF carries no chat template: Gemma's turn format is supplied
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
