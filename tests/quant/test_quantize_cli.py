"""`soar quantize` end to end on tiny random models: the directory it writes is a compressed-tensors
checkpoint that the compressed-tensors library parses and decompresses, that transformers loads
(its own loader, the oracle) with logits equal to soarllm's, and that soarllm serves on its
W8A16 / W4A16 kernels close to the unquantized model. Bad input gives clear errors and never a
half-written directory.

transformers 5 with compressed-tensors 0.20 loads our symmetric (W8A16) files on its default
path, but its default path cannot take the *packed* zero points of asymmetric int4 files (it
allocates them unpacked and reports a size mismatch; the library's own compress and decompress
pack them, as vLLM reads them); there transformers' ``dequantize=True`` path is the oracle.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from soarllm.cli.main import main
from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.quant.compare import load_model, run_layers
from soarllm.quant.compressed_tensors import CompressedW8A16Method
from soarllm.quant.quantize import QuantizeOptions
from soarllm.quant.w4a16 import W4A16Method
from tests.tiny import make_tiny_model

IDS = [[5, 17, 99, 230, 41, 8, 300, 12, 77, 140, 61, 2, 250, 19, 88, 400, 33, 7, 123, 64]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama")


def _quantize(src, out, *extra) -> int:
    return main(["quantize", str(src), "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory):
    """scheme-method -> directory written by `soar quantize` (float32 scales and other tensors)."""
    root = tmp_path_factory.mktemp("written")
    runs = {
        "w8a16-rtn": ["--scheme", "w8a16", "--method", "rtn"],
        "w4a16-rtn": ["--scheme", "w4a16", "--method", "rtn", "--group-size", "32"],
        "w4a16-gptq": ["--scheme", "w4a16", "--method", "gptq", "--group-size", "32",
                       "--num-samples", "4", "--seq-len", "64", "--calib", "stdlib"],
        "w4a16-awq": ["--scheme", "w4a16", "--method", "awq", "--group-size", "32",
                      "--num-samples", "4", "--seq-len", "64", "--calib", "stdlib"],
    }
    out = {}
    for name, argv in runs.items():
        assert _quantize(tiny, root / name, *argv, "--dtype", "float32") == 0
        out[name] = root / name
    return out


def _hf_logits(path, **kw) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0].float()


def _our_logits(path, quantization=None) -> torch.Tensor:
    model, _, _ = load_model(str(path), quantization)
    return run_layers(model, IDS[0])[1], model


@pytest.mark.parametrize("name", ["w8a16-rtn", "w4a16-rtn", "w4a16-gptq", "w4a16-awq"])
def test_written_directory_is_a_compressed_tensors_checkpoint(written, name):
    from compressed_tensors.quantization import QuantizationConfig

    path = written[name]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    config = json.loads((path / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    assert qc.quant_method == "compressed-tensors" and qc.format == "pack-quantized"
    assert qc.ignore == ["lm_head"]
    weights = qc.config_groups["group_0"].weights
    assert weights.num_bits == (8 if name.startswith("w8") else 4)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    packed = {k for k in keys if k.endswith(".weight_packed")}
    assert len(packed) == 2 * 7  # every decoder linear of both layers
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert not any(k.endswith("proj.weight") for k in keys)


@pytest.mark.parametrize("name", ["w8a16-rtn", "w4a16-rtn", "w4a16-gptq", "w4a16-awq"])
def test_transformers_loads_what_we_write_with_the_same_logits(written, name):
    ours, model = _our_logits(written[name])
    expected = CompressedW8A16Method if name.startswith("w8") else W4A16Method
    methods = [m.quant_method for m in model.modules() if hasattr(m, "quant_method")]
    assert sum(isinstance(q, expected) for q in methods) == 2 * 4  # qkv, o, gate_up, down
    kw = {} if name.startswith("w8") else {"quantization_config": _dequantize_config()}
    theirs = _hf_logits(written[name], **kw)
    # our CPU kernels run in bfloat16 (activations and scales), transformers in float32
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    assert bool((cos > 0.999).all()), cos
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
    # soarllm's dequantized path (quantization="none") computes in float32: equal to transformers
    dense, _ = _our_logits(written[name], "none")
    torch.testing.assert_close(dense, theirs, rtol=1e-4, atol=1e-4)


def test_a_model_with_biases_keeps_them(tmp_path):
    # Qwen2's q/k/v projections have biases: written beside the compressed weights (they were
    # dropped once, and the written checkpoint could not be loaded), and transformers reading
    # the file computes what soarllm computes from it
    src = make_tiny_model(tmp_path / "qwen2", "qwen2")
    out = tmp_path / "w8a16"
    assert _quantize(src, out, "--scheme", "w8a16", "--method", "rtn", "--dtype", "float32") == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{proj}.bias" in keys
        assert f"model.layers.0.self_attn.{proj}.weight_packed" in keys
    dense, _ = _our_logits(out, "none")
    torch.testing.assert_close(dense, _hf_logits(out), rtol=1e-4, atol=1e-4)


def _dequantize_config():
    from transformers import CompressedTensorsConfig

    return CompressedTensorsConfig(dequantize=True)


def test_w8a16_logits_stay_close_to_the_unquantized_model(tiny, written):
    base, _ = _our_logits(tiny)
    quant, _ = _our_logits(written["w8a16-rtn"])
    cos = torch.nn.functional.cosine_similarity(base, quant, dim=-1)
    assert bool((cos > 0.99).all()), cos


def test_w8a16_greedy_tokens_agree_with_the_unquantized_model(tiny, written):
    from soarllm import LLM, SamplingParams

    prompts = ["def parse_args(", "import collections\n", "class Encoder(", "return self."]
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)
    outs = []
    for path in (tiny, written["w8a16-rtn"]):
        llm = LLM(str(path), dtype="float32", max_model_len=128)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        del llm
    agreed = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
              for a, b in zip(*outs)]
    assert sum(agreed) >= 0.75 * 12 * len(prompts), agreed


def test_stored_integers_are_exactly_what_the_layers_hold(written):
    """The library's decompression of each file layer == the weight our W4A16 layer computes with
    on the dequantized (non-kernel) path, i.e. the repack loses nothing."""
    from soarllm.model.loader import load_checkpoint
    from soarllm.model.registry import resolve_model_class
    from soarllm.quant.config import get_quant_config

    ckpt = load_checkpoint(str(written["w4a16-gptq"]))
    qc = get_quant_config(None, ckpt, resolve_model_class(ckpt.config).packed_modules)
    for name, obj in qc.weights(ckpt, torch.float32):
        if not hasattr(obj, "to_int4"):
            continue
        q, scale, zero = obj.to_int4(32)
        rows, cols = obj.shape
        ours = ((q.float().reshape(rows, -1, 32) - 8) * scale[..., None] + zero[..., None])
        torch.testing.assert_close(ours.reshape(rows, cols), obj.dequantize(), rtol=0, atol=1e-6,
                                   msg=name)


def test_tied_head_and_bfloat16_scales(tmp_path):
    """Tied embeddings: no lm_head tensor is written and the head is the embedding; bfloat16
    scales (the default --dtype) load too; without --group-size the largest group dividing every
    layer's inputs (128 here) is taken."""
    src = make_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True, hidden_size=128,
                          intermediate_size=256)
    out = tmp_path / "q"
    assert _quantize(src, out, "--scheme", "w4a16") == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 128
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.bfloat16
    ours, _ = _our_logits(out)
    theirs = _hf_logits(out, quantization_config=_dequantize_config())
    assert bool((torch.nn.functional.cosine_similarity(ours, theirs, dim=-1) > 0.999).all())


# -- bad input ------------------------------------------------------------------------------------

def test_unknown_scheme_or_method_is_refused(tiny, tmp_path, capsys):
    for flag, value in (("--scheme", "w3a16"), ("--method", "hqq")):
        with pytest.raises(SystemExit) as e:
            _quantize(tiny, tmp_path / "x", flag, value)
        assert e.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown scheme 'w3a16'; use one of w8a16, w4a16, w8a8"):
        QuantizeOptions(scheme="w3a16").check()
    with pytest.raises(ConfigError, match="unknown method 'hqq'"):
        QuantizeOptions(method="hqq").check()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("scheme", "method", "hint"), [
    ("w8a16", "awq", "use rtn or gptq with w8a16, or --method awq with --scheme w4a16"),
    ("w4a16", "smoothquant", "use rtn or gptq or awq with w4a16, or --method smoothquant with "
                             "--scheme w8a8"),
    ("w8a8", "gptq", "use rtn or smoothquant with w8a8"),
])
def test_a_method_that_does_not_fit_the_scheme_is_refused(tiny, tmp_path, capsys, scheme,
                                                          method, hint):
    assert _quantize(tiny, tmp_path / "x", "--scheme", scheme, "--method", method) == 1
    err = capsys.readouterr().err
    assert f"--method {method} does not apply to --scheme {scheme}" in err and hint in err
    assert not (tmp_path / "x").exists()


def test_smoothing_strength_outside_zero_one_or_without_smoothquant(tiny, tmp_path, capsys):
    for alpha in ("1.5", "-0.1"):
        assert _quantize(tiny, tmp_path / "x", "--scheme", "w8a8", "--method", "smoothquant",
                         "--smoothing-strength", alpha) == 1
        assert f"smoothing strength {float(alpha)} must be between 0 and 1" in capsys.readouterr().err
    assert _quantize(tiny, tmp_path / "x", "--scheme", "w8a8", "--method", "rtn",
                     "--smoothing-strength", "0.5") == 1
    assert "--smoothing-strength applies to --method smoothquant only" in capsys.readouterr().err
    assert _quantize(tiny, tmp_path / "x", "--scheme", "w8a8", "--group-size", "32") == 1
    assert "--group-size applies to w4a16 only (w8a8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_architecture_without_smoothing_mappings_is_refused(tmp_path, capsys):
    """Phi-3 fuses q/k/v and gate/up into one linear each: no norm feeds a group of separate
    projections. SmoothQuant and AWQ refuse it before calibrating; plain W8A8 writes it."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from tests.tiny import train_tokenizer

    src = tmp_path / "phi3"
    src.mkdir()
    tok = train_tokenizer(src)
    Phi3ForCausalLM(Phi3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )).save_pretrained(src)
    for scheme, method in (("w8a8", "smoothquant"), ("w4a16", "awq")):
        assert _quantize(src, tmp_path / "x", "--scheme", scheme, "--method", method,
                         "--group-size" if scheme == "w4a16" else "--dtype",
                         "32" if scheme == "w4a16" else "bfloat16") == 1
        err = capsys.readouterr().err
        assert "Phi3DecoderLayer has no smoothing mappings (lacks self_attn.q_proj" in err
        assert "quantize without smoothing (--method rtn)" in err
    assert not (tmp_path / "x").exists()
    assert _quantize(src, tmp_path / "x", "--scheme", "w8a8", "--method", "rtn") == 0


def test_w8a8_smoothquant_by_the_cli(tiny, tmp_path, capsys):
    """`soar quantize --scheme w8a8 --method smoothquant` writes what compressed-tensors parses as
    W8A8 (int8 channel weights, dynamic int8 token activations) and transformers runs close to
    the float model."""
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "sq"
    assert _quantize(tiny, out, "--scheme", "w8a8", "--method", "smoothquant",
                     "--smoothing-strength", "0.6", "--num-samples", "4", "--seq-len", "64",
                     "--calib", "stdlib") == 0
    assert "SmoothQuant: strength 0.6 over 6 mappings" in capsys.readouterr().err
    qc = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"])
    assert qc.format == "int-quantized" and qc.ignore == ["lm_head"]
    group = qc.config_groups["group_0"]
    assert (group.weights.num_bits, group.weights.strategy) == (8, "channel")
    assert (group.input_activations.strategy, group.input_activations.dynamic) == ("token", True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.int8
    assert sum(k.endswith("_proj.weight_scale") for k in keys) == 2 * 7
    base, quant = _hf_logits(tiny), _hf_logits(out)
    cos = torch.nn.functional.cosine_similarity(base, quant, dim=-1)
    assert bool((cos > 0.99).all()), cos


# -- --analyze ------------------------------------------------------------------------------------

def test_analyze_finds_the_injected_outlier_channels(outlier_model, capsys):
    from tests.quant.conftest import OUTLIER_CHANNELS

    argv = ["quantize", "--analyze", str(outlier_model), "--num-samples", "4", "--seq-len", "64",
            "--no-progress"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 4  # per layer: q/k/v's input, o's, gate/up's, down's
    assert [r["ratio"] for r in rows] == sorted((r["ratio"] for r in rows), reverse=True)
    top = rows[:4]  # the inputs of the norms with outliers, both layers
    assert {r["input"].rsplit(".", 1)[-1] for r in top} == {"{q_proj,k_proj,v_proj}",
                                                            "{gate_proj,up_proj}"}
    for r in top:
        assert {c for c, _ in r["top"][:3]} == set(OUTLIER_CHANNELS), r
        assert r["ratio"] > 5 and r["top"][3][1] < 3  # the fourth channel is ordinary
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["layer", "input", "channels"]
    assert table[2].startswith(top[0]["input"])


def test_analyze_and_out_go_separately(tiny, tmp_path, capsys):
    assert main(["quantize", str(tiny), "--analyze", "--out", str(tmp_path / "x")]) == 1
    assert "--analyze writes nothing; leave out --out" in capsys.readouterr().err
    assert main(["quantize", str(tiny)]) == 1
    assert "--out is required" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_group_size_that_does_not_divide_the_inputs(tiny, tmp_path, capsys):
    # the tiny model's layers have 64 or 128 inputs: a group of 128 does not fit them all
    assert _quantize(tiny, tmp_path / "x", "--scheme", "w4a16", "--group-size", "128") == 1
    err = capsys.readouterr().err
    assert "group size 128 does not divide the 64 inputs" in err
    assert "--group-size 32 or 64" in err
    assert _quantize(tiny, tmp_path / "x", "--scheme", "w4a16", "--group-size", "48") == 1
    assert "use one of 32, 64, 128" in capsys.readouterr().err
    assert _quantize(tiny, tmp_path / "x", "--scheme", "w8a16", "--group-size", "32") == 1
    assert "--group-size applies to w4a16 only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_existing_out_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _quantize(tiny, out, "--scheme", "w8a16") == 1
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _quantize(tiny, tmp_path / "q", "--scheme", "w8a16")
    assert list(tmp_path.iterdir()) == []  # neither the directory nor its temporary


# -- loading files soarllm cannot serve ---------------------------------------------------------

def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(path, fn):
    config = json.loads((path / "config.json").read_text())
    fn(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


def test_unsupported_schemes_are_refused_with_what_is_supported(written, tmp_path):
    from compressed_tensors.quantization import QuantizationArgs

    static = _copy(written["w8a16-rtn"], tmp_path / "static")
    acts = QuantizationArgs(num_bits=8, type="int", strategy="tensor", dynamic=False).model_dump()
    _edit_config(static, lambda qc: qc["config_groups"]["group_0"].update(input_activations=acts))
    with pytest.raises(UnsupportedModelError, match="static .*activation.*Supported: weight-only"):
        load_model(str(static))
    fp8 = _copy(written["w8a16-rtn"], tmp_path / "fp8")
    _edit_config(fp8, lambda qc: qc["config_groups"]["group_0"]["weights"].update(type="float"))
    with pytest.raises(UnsupportedModelError, match="float weights"):
        load_model(str(fp8))
    with pytest.raises(ConfigError, match="already quantized"):
        load_model(str(written["w8a16-rtn"]), "w4a16")


def test_a_checkpoint_missing_tensors_is_refused(written, tmp_path):
    broken = _copy(written["w4a16-rtn"], tmp_path / "broken")
    file = broken / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("k_proj.weight_scale")}
    save_file(tensors, str(file))
    with pytest.raises(UnsupportedModelError, match="incomplete or does not match"):
        load_model(str(broken))


# -- checkpoints written by the reference library ----------------------------------------------

def _library_checkpoint(src, out, weights_args):
    """What llm-compressor does, with compressed-tensors alone: attach the scheme to transformers'
    model, set each layer's scale / zero point from its weight's min / max (the library's
    calculate_qparams, as its min-max observer does), compress, save, write the config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights_args)},
        ignore=["lm_head"])
    apply_quantization_config(model, config)
    for _, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        w = module.weight.data
        if scheme.weights.strategy == "group":
            w = w.reshape(w.shape[0], -1, scheme.weights.group_size)
        scale, zp = calculate_qparams(w.amin(-1), w.amax(-1), scheme.weights)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        module.weight_zero_point.data.copy_(zp.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(str(out))
    compressor.update_config(str(out))
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)



def test_soarllm_loads_a_checkpoint_the_library_wrote(tiny, tmp_path):
    """Symmetric int4 group 32 (llm-compressor's W4A16 preset, with a smaller group) and int8 per
    channel, written by compressed-tensors' ModelCompressor: soarllm serves them on its kernels
    with transformers' logits (transformers loading the same files)."""
    from compressed_tensors.quantization import QuantizationArgs

    cases = {
        "int4": QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=32,
                                 symmetric=True),
        "int8": QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True),
    }
    for name, args in cases.items():
        out = tmp_path / name
        _library_checkpoint(tiny, out, args)
        ours, model = _our_logits(out)
        expected = W4A16Method if name == "int4" else CompressedW8A16Method
        assert sum(isinstance(getattr(m, "quant_method", None), expected)
                   for m in model.modules()) == 8, name
        theirs = _hf_logits(out)
        cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
        assert bool((cos > 0.999).all()), (name, cos)


def test_a_library_scheme_without_a_kernel_is_refused(tiny, tmp_path):
    """llm-compressor's W8A16 preset stores int8 in groups of 128: no per-channel kernel fits."""
    from compressed_tensors.quantization import QuantizationArgs

    src = make_tiny_model(tmp_path / "wide", "llama", hidden_size=128, intermediate_size=256)
    _library_checkpoint(src, tmp_path / "g8", QuantizationArgs(
        num_bits=8, type="int", strategy="group", group_size=128, symmetric=True))
    with pytest.raises(UnsupportedModelError, match="8-bit symmetric group-wise weights"):
        load_model(str(tmp_path / "g8"))


# -- the real default model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_quantized(default_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("default_q")
    out = {}
    for scheme in ("w8a16", "w4a16"):
        assert _quantize(default_model_path, root / scheme, "--scheme", scheme) == 0
        out[scheme] = root / scheme
    return out


@pytest.mark.model
def test_default_model_w8a16_logits_stay_close(default_model_path, default_quantized):
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1056, 30]
    base, _, _ = load_model(str(default_model_path), "none")
    quant, _, _ = load_model(str(default_quantized["w8a16"]))
    la, lb = run_layers(base, ids)[1], run_layers(quant, ids)[1]
    cos = torch.nn.functional.cosine_similarity(la, lb, dim=-1)
    assert bool((cos > 0.99).all()), cos


@pytest.mark.model
@pytest.mark.parametrize(("scheme", "floor"), [("w8a16", 0.9), ("w4a16", 0.5)])
def test_default_model_next_tokens_agree_with_full_precision(default_model_path,
                                                              default_quantized, scheme, floor):
    """The full-precision base is the GGUF file dequantized; on its own greedy continuations of
    four prompts, the quantized copy (W8A16 / W4A16 group 64 kernels) picks the same next token
    at most positions. (Free-running greedy continuations are not compared: on this 135M model
    they split at the first near-tie, e.g. W8A16 RTN, even dequantized to float32, keeps
    [12, 16, 5, 1] of 16 tokens, while its perplexity moves by 0.2%.) Measured: W8A16 0.92,
    W4A16 RTN group 64 0.58 (prompt positions included): 4-bit RTN costs this small model a lot."""
    from soarllm import LLM, SamplingParams
    from soarllm.quant.compare import compare_models

    prompts = ["def quicksort(arr):", "The capital of France is",
               "Once upon a time, in a small village by the sea,", "import os\nimport sys\n"]
    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16)
    llm = LLM(str(default_model_path), dtype="float32", quantization="none", max_model_len=128)
    seqs = [o.prompt_token_ids + list(o.outputs[0].token_ids)
            for o in llm.generate(prompts, params)]
    del llm
    base, _, _ = load_model(str(default_model_path), "none")
    quant, _, _ = load_model(str(default_quantized[scheme]))
    r = compare_models(base, quant, seqs)
    print(f"{scheme}: next-token agreement {r.top1_agreement:.3f}, top-5 {r.topk_agreement:.3f}")
    assert r.top1_agreement >= floor
