"""2:4 sparsity (`soar quantize --sparsity 2:4`) on tiny random models.

Oracles: the mask rules recomputed here with plain torch; the compressed-tensors library's own
pieces for the file (unpack_from_int32, unpack_bitmasks, its pack-quantized decompressor — the
library dropped its sparse compressors in 0.15, so the one-line scatter of the kept values is the
test's); transformers running the weights the library decompressed, for the logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from soarllm.cli.main import main
from soarllm.errors import ConfigError, UnsupportedModelError
from soarllm.quant.compare import load_model, run_layers
from soarllm.quant.quantize import QuantizeOptions
from soarllm.quant.sparse24 import Sparse24Method
from soarllm.quant.sparsity import mask_24, prune_24
from tests.tiny import make_tiny_model

IDS = [5, 17, 99, 230, 41, 8, 300, 12, 77, 140, 61, 2, 250, 19, 88, 400, 33, 7, 123, 64]
GPTQ = ["--num-samples", "4", "--seq-len", "64", "--calib", "stdlib"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama")


def _quantize(src, out, *extra) -> int:
    return main(["quantize", str(src), "--out", str(out), "--no-progress", "--dtype", "float32",
                 *extra])


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    runs = {
        "w8a16-rtn": ["--scheme", "w8a16", "--method", "rtn"],
        "w4a16-gptq": ["--scheme", "w4a16", "--method", "gptq", "--group-size", "32", *GPTQ],
        "w4a16-rtn-wanda": ["--scheme", "w4a16", "--group-size", "32", "--prune", "wanda", *GPTQ],
    }
    for name, argv in runs.items():
        assert _quantize(tiny, root / name, *argv, "--sparsity", "2:4") == 0
    return {name: root / name for name in runs}


# -- the mask -----------------------------------------------------------------------------------

def test_mask_keeps_exactly_two_of_every_four():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    pruned, mask = prune_24(w)
    assert mask.reshape(24, 16, 4).sum(-1).eq(2).all()
    assert torch.equal(pruned, torch.where(mask, w, torch.zeros_like(w)))
    # by magnitude: each kept |w| is at least each dropped |w| of its group
    a = w.abs().reshape(24, 16, 4)
    m = mask.reshape(24, 16, 4)
    kept_min = torch.where(m, a, torch.inf).amin(-1)
    dropped_max = torch.where(m, -torch.inf, a).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_wanda_keeps_the_larger_weight_times_activation_norm():
    torch.manual_seed(1)
    out, cols, n = 16, 32, 200
    w = torch.randn(out, cols)
    x = torch.randn(n, cols) * torch.logspace(-1, 1, cols)[torch.randperm(cols)]  # uneven inputs
    hessian = 2 * x.T @ x / n  # GPTQ's H
    _, mask = prune_24(w, hessian)
    score = w.abs() * torch.linalg.vector_norm(x, dim=0)  # Wanda's |W_ij| * ||X_j||_2
    for r in range(out):
        for g in range(cols // 4):
            best = sorted(range(4), key=lambda j: -score[r, 4 * g + j].item())[:2]
            kept = [j for j in range(4) if mask[r, 4 * g + j]]
            assert sorted(best) == kept, (r, g)
    assert not torch.equal(mask, mask_24(w.abs()))  # activations changed the choice


def test_gptq_with_a_mask_zeroes_the_pruned_weights_and_compensates_them():
    """The pruned weights come out exactly 0 on the int4 grid, and the output error over the
    calibration activations (||W X - Q X||, plain torch) is below pruning then rounding."""
    from soarllm.quant.compressed_tensors import weight_args
    from soarllm.quant.gptq import gptq_quantize, rtn_quantize

    torch.manual_seed(2)
    out, cols, n = 32, 64, 512
    w = torch.randn(out, cols)
    x = torch.randn(n, cols) @ torch.randn(cols, cols) / 4  # correlated inputs
    hessian = 2 * x.T @ x / n
    pruned, mask = prune_24(w, hessian)
    args = weight_args("w4a16", 32)
    q, _, _ = gptq_quantize(w, hessian, args, torch.float32, mask=mask)
    assert (q[~mask] == 0).all()
    rtn, _, _ = rtn_quantize(pruned, args, torch.float32)

    def err(m):
        return torch.linalg.matrix_norm(x @ (w - m).T).item()

    assert err(q) < 0.95 * err(rtn), (err(q), err(rtn))  # measured: 0.89


# -- the file -----------------------------------------------------------------------------------

def _sparse_modules(path) -> dict[str, dict[str, torch.Tensor]]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = {}
    for name, t in tensors.items():
        module, suffix = name.rsplit(".", 1)
        if suffix in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                      "bitmask"):
            modules.setdefault(module, {})[suffix] = t
    return modules


def _library_dense(parts, args):
    """The dense float weight of a sparse-24-bitmask layer by the library's own unpacking and
    decompressor, and the library's unpacked keep mask."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.utils.helpers import unpack_bitmasks

    rows, cols = parts["weight_shape"].tolist()
    mask = unpack_bitmasks(parts["bitmask"], [rows, cols])
    kept = unpack_from_int32(parts["weight_packed"], args.num_bits, torch.Size((rows, cols // 2)))
    scale = parts["weight_scale"]
    if "weight_zero_point" in parts:
        zp = unpack_from_int32(parts["weight_zero_point"], args.num_bits,
                               torch.Size((rows, scale.shape[-1])), packed_dim=0)
        dense = zp.repeat_interleave(cols // scale.shape[-1], dim=1)  # dequantizes to 0
    else:
        dense = torch.zeros(rows, cols, dtype=torch.int8)
    dense[mask] = kept.flatten()
    state = {**parts, "weight_packed": pack_to_int32(dense, args.num_bits)}
    del state["bitmask"]
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    return compressor.decompress(state, scheme)["weight"], mask


def _args(path):
    from compressed_tensors.quantization import QuantizationConfig

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    return QuantizationConfig.model_validate(qc).config_groups["group_0"].weights, qc


def _our_layer(model, module: str):
    """(our Linear holding `module`, its first row) through the model's merged layers."""
    for frag, (merged, shard) in model.packed_modules.items():
        if module.endswith(f".{frag}"):
            layer = model.get_submodule(module[: -len(frag)] + merged)
            return layer, layer.shard_offsets[shard]
    layer = model.get_submodule(module)
    return layer, (0, layer.out_features)


@pytest.mark.parametrize("name", ["w8a16-rtn", "w4a16-gptq"])
def test_the_file_decompresses_with_the_library_to_the_weights_we_compute_with(written, name):
    args, qc = _args(written[name])
    assert qc["format"] == "pack-quantized"
    sc = qc["sparsity_config"]
    assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    from compressed_tensors.config import SparsityCompressionConfig

    SparsityCompressionConfig.load_from_registry(sc["format"], **sc)  # the library parses it
    model, _, _ = load_model(str(written[name]))
    modules = _sparse_modules(written[name])
    assert len(modules) == 2 * 7
    for module, parts in modules.items():
        dense, mask = _library_dense(parts, args)
        assert mask.reshape(mask.shape[0], -1, 4).sum(-1).eq(2).all(), module
        assert (dense[~mask] == 0).all(), module
        layer, (off, size) = _our_layer(model, module)
        assert isinstance(layer.quant_method, Sparse24Method)
        ours = layer.quant_method.dequantized_weight(layer)[off : off + size]
        torch.testing.assert_close(ours, dense.float(), rtol=0, atol=0, msg=module)


def _float_copy(path, out):
    """`path` as a float checkpoint: each 2:4 layer's weight as the library decompresses it."""
    args, _ = _args(path)
    out.mkdir()
    for src in path.iterdir():
        if src.name not in ("config.json", "model.safetensors"):
            shutil.copy(src, out / src.name)
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    modules = _sparse_modules(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[0] not in modules}
    for module, parts in modules.items():
        tensors[f"{module}.weight"] = _library_dense(parts, args)[0].float().contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("name", ["w8a16-rtn", "w4a16-rtn-wanda"])
def test_logits_equal_transformers_on_the_library_decompressed_weights(written, name, tmp_path):
    from transformers import AutoModelForCausalLM

    from soarllm import LLM, SamplingParams

    ref = AutoModelForCausalLM.from_pretrained(str(_float_copy(written[name], tmp_path / "f")),
                                               dtype=torch.float32)
    with torch.no_grad():
        theirs = ref(torch.tensor([IDS])).logits[0]
    model, _, _ = load_model(str(written[name]))
    torch.testing.assert_close(run_layers(model, IDS)[1], theirs, rtol=1e-4, atol=1e-4)
    # served through the engine: prompt logprobs and greedy tokens as transformers has them
    llm = LLM(str(written[name]), dtype="float32", max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, prompt_logprobs=1)
    out = llm.generate(IDS, params)[0]
    assert out.prompt_token_ids == IDS
    del llm
    expected = torch.log_softmax(theirs, dim=-1)
    for i, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp[IDS[i]].logprob == pytest.approx(expected[i - 1, IDS[i]].item(), abs=1e-4)
    greedy = ref.generate(torch.tensor([IDS]), max_new_tokens=8, do_sample=False,
                          min_new_tokens=8)[0, len(IDS):].tolist()
    assert list(out.outputs[0].token_ids) == greedy


def test_a_sparse_layer_holds_fewer_bytes_than_the_dense_quantized_one(written):
    def nbytes(layer):
        return sum(p.numel() * p.element_size() for p in layer.parameters())

    for name in ("w8a16-rtn", "w4a16-gptq"):
        sparse, _, _ = load_model(str(written[name]))
        dense, _, _ = load_model(str(written[name]), "densify")
        for module in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.qkv_proj"):
            s, d = sparse.get_submodule(module), dense.get_submodule(module)
            assert isinstance(s.quant_method, Sparse24Method)
            assert not isinstance(d.quant_method, Sparse24Method)
            assert nbytes(s) < nbytes(d), (name, module, nbytes(s), nbytes(d))
            # kept values + bitmask: 1/2 + 1/8 byte per int8 weight, 1/4 + 1/8 per int4 weight
            weight = s.values.numel() * s.values.element_size() + s.bitmask.numel()
            eighths = 5 if name.startswith("w8") else 3
            assert weight == s.out_features * s.in_features * eighths // 8
        # densified at load: the same weights (the dense kernels run in bfloat16 on the CPU)
        a, b = run_layers(sparse, IDS)[1], run_layers(dense, IDS)[1]
        assert bool((torch.nn.functional.cosine_similarity(a, b, dim=-1) > 0.999).all())


def test_the_dense_format_loads_in_transformers_as_written(tiny, written, tmp_path):
    """--sparse-format dense stores the zeros in the ordinary pack-quantized tensors: transformers
    reads it on its own; it holds the same weights as the compressed file."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    assert _quantize(tiny, out, "--scheme", "w8a16", "--sparsity", "2:4",
                     "--sparse-format", "dense") == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["format"] == "dense"
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4"
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        theirs = ref(torch.tensor([IDS])).logits[0]
    model, _, _ = load_model(str(written["w8a16-rtn"]))
    torch.testing.assert_close(run_layers(model, IDS)[1], theirs, rtol=1e-4, atol=1e-4)
    assert (out / "model.safetensors").stat().st_size > (
        written["w8a16-rtn"] / "model.safetensors").stat().st_size


# -- bad input ----------------------------------------------------------------------------------

def test_other_patterns_and_options_are_refused(tiny, tmp_path, capsys):
    assert _quantize(tiny, tmp_path / "x", "--scheme", "w8a16", "--sparsity", "4:8") == 1
    assert "sparsity '4:8' is not supported; the one pattern is --sparsity 2:4" in \
        capsys.readouterr().err
    with pytest.raises(ConfigError, match="the one pattern is --sparsity 2:4"):
        QuantizeOptions(sparsity="unstructured").check()
    with pytest.raises(ConfigError, match="--prune applies with --sparsity 2:4 only"):
        QuantizeOptions(prune="wanda").check()
    for scheme, method in (("w8a8", "rtn"), ("w8a8", "smoothquant"), ("w4a16", "awq")):
        with pytest.raises(ConfigError, match="--sparsity 2:4 applies to the weight-only"):
            QuantizeOptions(scheme=scheme, method=method, sparsity="2:4").check()
    assert not (tmp_path / "x").exists()


def test_inputs_not_a_multiple_of_four_are_refused(tmp_path, capsys):
    src = make_tiny_model(tmp_path / "odd", "llama", intermediate_size=130)
    assert _quantize(src, tmp_path / "x", "--scheme", "w8a16", "--sparsity", "2:4") == 1
    err = capsys.readouterr().err
    assert "2:4 sparsity needs a multiple of 4 inputs per layer" in err
    assert "model.layers.0.mlp.down_proj has 130" in err
    assert not (tmp_path / "x").exists()


def test_a_stored_mask_that_is_not_two_of_four_is_refused(written, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(written["w8a16-rtn"], broken)
    file = broken / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.0.mlp.up_proj.bitmask"
    tensors[key][3, 0] = 0b0111_0011  # inputs 0..3 keep 2 (fine), 4..7 keep 3
    save_file(tensors, str(file))
    with pytest.raises(UnsupportedModelError,
                       match=r"keeps 3 of the 4 inputs 4\.\.7 of row 3.*exactly 2 of every 4"):
        load_model(str(broken))


def test_unsupported_sparsity_configs_are_refused(tiny, written, tmp_path):
    cases = (("sparse-bitmask", "unstructured", "sparsity format 'sparse-bitmask'"),
             ("sparse-24-bitmask", "4:8", "structure '4:8'"),
             ("marlin-24", "2:4", "sparsity format 'marlin-24'"))
    for fmt, structure, match in cases:
        path = tmp_path / fmt.replace(":", "")
        shutil.copytree(written["w8a16-rtn"], path)
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"]["sparsity_config"].update(format=fmt,
                                                                sparsity_structure=structure)
        (path / "config.json").write_text(json.dumps(config))
        with pytest.raises(UnsupportedModelError, match=match):
            load_model(str(path))
        shutil.rmtree(path)
    with pytest.raises(ConfigError, match="'densify' applies to a compressed-tensors 2:4"):
        load_model(str(tiny), "densify")
    dense = tmp_path / "dense"  # a compressed-tensors checkpoint without 2:4 layers
    assert _quantize(tiny, dense, "--scheme", "w8a16", "--method", "rtn") == 0
    with pytest.raises(ConfigError, match="has no 2:4 layers"):
        load_model(str(dense), "densify")
