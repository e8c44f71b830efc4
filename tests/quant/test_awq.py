"""AWQ against round-to-nearest on what AWQ does not see: the output error of the group-quantized
layers on *held-out* activations, on synthetic activations with salient channels, on the tiny
outlier model's real layer inputs and on its logits; and the W4A16 file it writes, loaded by
transformers through compressed-tensors.
"""

from __future__ import annotations

import pytest
import torch

from soarllm.quant.awq import clip_search, output_error, search_scales
from soarllm.quant.compressed_tensors import compress_linear, weight_args
from soarllm.quant.gptq import HessianAccumulator, rtn_quantize
from soarllm.quant.quantize import (
    QuantizeOptions,
    calibration_samples,
    float_model,
    load_float_checkpoint,
    quantize_float_model,
    write_directory,
)

ARGS = weight_args("w4a16", 32)


def _held_out_error(weight, effective, x) -> float:
    """||X W^T - X Q^T|| / ||X W^T||, by plain matmuls (the oracle of output_error)."""
    ref = x @ weight.t()
    return ((ref - x @ effective.t()).norm() / ref.norm()).item()


def _awq_and_rtn(weight, calib, held_out):
    acc = HessianAccumulator(weight.shape[1])
    acc.add(calib)
    result = search_scales(weight, calib.abs().mean(0), acc.H, ARGS, torch.float32)
    s = result.scales
    q_awq = rtn_quantize(weight * s, ARGS, torch.float32)[0] / s
    q_rtn = rtn_quantize(weight, ARGS, torch.float32)[0]
    return result, _held_out_error(weight, q_awq, held_out), _held_out_error(weight, q_rtn,
                                                                             held_out)


def test_output_error_is_the_squared_output_difference():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 64, generator=g), torch.randn(16, 64, generator=g)
    q = w + 0.01 * torch.randn(16, 64, generator=g)
    acc = HessianAccumulator(64)
    acc.add(x)
    expected = ((x @ w.t() - x @ q.t()) ** 2).sum().item() * 2 / 300  # H = 2 X^T X / n
    assert output_error(w, q, acc.H) == pytest.approx(expected, rel=1e-4)


def test_awq_beats_rtn_on_held_out_activations_with_salient_channels():
    g = torch.Generator().manual_seed(0)
    gain = torch.ones(256)
    gain[torch.randperm(256, generator=g)[:8]] = 20  # 3% salient input channels

    def acts(n):
        return torch.randn(n, 256, generator=g) * gain

    weight = torch.randn(96, 256, generator=g) * 0.05
    result, awq, rtn = _awq_and_rtn(weight, acts(1024), acts(1024))
    assert result.alpha > 0 and result.error < result.rtn_error
    assert awq < 0.8 * rtn, (awq, rtn)


def test_clip_search_lowers_the_held_out_error_further_and_stays_on_the_stored_grid():
    """After AWQ's scaling, shrinking each group's range (chosen on the calibration Gram matrix)
    lowers the held-out error again; the result is exactly what the file stores (the library's
    pack and unpack give it back)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    g = torch.Generator().manual_seed(1)
    gain = torch.ones(256)
    gain[torch.randperm(256, generator=g)[:8]] = 20

    def acts(n):
        return torch.randn(n, 256, generator=g) * gain

    weight = torch.randn(96, 256, generator=g) * 0.05
    calib, held_out = acts(1024), acts(1024)
    result, awq, _ = _awq_and_rtn(weight, calib, held_out)
    s = result.scales
    acc = HessianAccumulator(256)
    acc.add(calib / s)  # the scaled layer's input
    q, scale, zp = clip_search(weight * s, acc.H, ARGS, torch.float32)
    clipped = _held_out_error(weight, q / s, held_out)
    assert clipped < 0.97 * awq, (clipped, awq)
    stored = compress_linear(q, scale, zp, ARGS)
    back = BaseCompressor.get_value_from_registry("pack-quantized").decompress(
        stored, QuantizationScheme(targets=["Linear"], weights=ARGS))["weight"]
    torch.testing.assert_close(back.float(), q, rtol=0, atol=1e-6)


def _layer_inputs(hf, name, samples):
    caught = []
    handle = hf.get_submodule(name).register_forward_pre_hook(
        lambda _m, args: caught.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for row in samples:
            hf(input_ids=row[None])
    handle.remove()
    return torch.cat(caught)


@pytest.fixture(scope="module")
def checkpoint(outlier_model):
    return load_float_checkpoint(str(outlier_model))


@pytest.mark.parametrize("layer", ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"])
def test_awq_beats_rtn_on_the_tiny_models_held_out_layer_inputs(checkpoint, layer):
    """Layer 1 of the outlier model: calibrated on standard-library source, scored on prose."""
    hf = float_model(checkpoint)
    name = f"model.layers.1.{layer}"
    calib = _layer_inputs(hf, name, calibration_samples(checkpoint.tokenizer_dir, "stdlib", 8, 64))
    held = _layer_inputs(hf, name, calibration_samples(checkpoint.tokenizer_dir, "prose", 8, 64))
    weight = hf.get_submodule(name).weight.detach()
    _, awq, rtn = _awq_and_rtn(weight, calib, held)
    assert awq < 0.95 * rtn, (awq, rtn)


def _awq_model(checkpoint, method):
    hf = float_model(checkpoint)
    opts = QuantizeOptions(scheme="w4a16", method=method, group_size=32, dtype="float32",
                           progress=False, num_samples=8, seq_len=64, calib="stdlib")
    compressed, summary = quantize_float_model(hf, checkpoint.tokenizer_dir, opts)
    return hf, compressed, opts, summary


def _logits(model, ids):
    with torch.no_grad():
        return torch.cat([model(input_ids=row[None]).logits[0] for row in ids])


def test_awq_lowers_the_w4a16_logit_error_of_a_model_with_outliers(checkpoint):
    held_out = calibration_samples(checkpoint.tokenizer_dir, "prose", 4, 64)
    base = _logits(float_model(checkpoint), held_out)
    errors = {}
    for method in ("rtn", "awq"):
        hf, _, _, summary = _awq_model(checkpoint, method)
        errors[method] = ((_logits(hf, held_out) - base).norm() / base.norm()).item()
    assert "AWQ" in summary
    assert errors["awq"] < 0.9 * errors["rtn"], errors


def test_awq_checkpoint_loads_in_transformers_with_our_logits(checkpoint, tmp_path):
    """The same W4A16 pack-quantized format as RTN/GPTQ (the existing loaders serve it); the
    smoothed norms and up/v projections are in the file. transformers (dequantize path, see
    test_quantize_cli) computes our model's logits."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    hf, compressed, opts, _ = _awq_model(checkpoint, "awq")
    write_directory(tmp_path / "awq", checkpoint, hf, compressed, opts)
    ids = calibration_samples(checkpoint.tokenizer_dir, "prose", 2, 32)
    theirs = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "awq"), dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True))
    torch.testing.assert_close(_logits(theirs, ids), _logits(hf, ids), rtol=1e-4, atol=1e-4)
    original = float_model(checkpoint)
    for norm in ("input_layernorm", "post_attention_layernorm"):  # AWQ's factors folded in
        assert not torch.equal(theirs.model.layers[0].get_submodule(norm).weight,
                               original.model.layers[0].get_submodule(norm).weight)
