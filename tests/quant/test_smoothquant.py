"""SmoothQuant and the smoothing mappings it shares with AWQ.

Oracles: transformers running the unsmoothed weights (smoothing must not change the float model),
compressed-tensors' own rounding for the W8A8 grid, and transformers loading our W8A8 files
through compressed-tensors (its own dynamic per-token activation quantization).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from soarllm.quant.activations import input_stats
from soarllm.quant.compressed_tensors import activation_args, weight_args
from soarllm.quant.fake_quant import activation_quantization, quantize_tokens
from soarllm.quant.gptq import rtn_quantize
from soarllm.quant.quantize import (
    QuantizeOptions,
    calibration_samples,
    decoder_linears,
    float_model,
    load_float_checkpoint,
    quantize_float_model,
    write_directory,
)
from soarllm.quant.smooth import fold_scales, smooth, smoothing_mappings, smoothquant_scales
from tests.quant.conftest import OUTLIER_CHANNELS


def _tiny_transformers(family: str):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    if family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16,
                                                   sliding_window=8))
    else:
        kv = 4 if family == "llama-mha" else 2
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=kv))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:  # norm weights off their init, outliers included
                p.uniform_(-0.5, 0.5) if family == "gemma3" else p.uniform_(0.5, 1.5)
                p[3] += 12
    return model.eval()


@pytest.mark.parametrize(("family", "mappings"), [("llama", 3), ("llama-mha", 4), ("gemma3", 3)])
def test_smoothing_leaves_the_float_model_unchanged(family, mappings):
    """q/k/v <- input norm, gate/up <- the MLP's norm (Gemma: pre_feedforward, weight 1 + w),
    down <- up, and o <- v without grouped-query attention: with factors from calibration
    statistics, transformers computes the same logits as on the unsmoothed weights."""
    model = _tiny_transformers(family)
    reference = copy.deepcopy(model)
    found = smoothing_mappings(model)
    assert len(found) == 2 * mappings
    names = [m.name for m in found[:mappings]]
    assert names[0] == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"
    assert names[1] == "model.layers.0.mlp.{gate_proj,up_proj}"
    assert found[1].smooth_name.endswith("pre_feedforward_layernorm" if family == "gemma3"
                                         else "post_attention_layernorm")
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 300, (4, 32), generator=g)
    observed = {m.balance_names[0]: m.balance[0] for m in found}
    stats = input_stats(model, observed, calib, progress=False)
    applied = smooth(found, {n: s.absmax for n, s in stats.stats.items()}, alpha=0.5)
    spread = max((s.max() / s.min()).item() for s in applied.values())
    assert spread > 5, spread  # factors far from equal: the test is not vacuous
    ids = torch.randint(0, 300, (2, 24), generator=g)
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_smoothquant_factors_follow_the_formula():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    weight = torch.tensor([[1.0, -4.0, 2.0, 0.0], [-0.25, 1.0, 1.0, 0.0]])
    s = smoothquant_scales(act, weight, 0.5)
    # max|W_j| = 1, 4, 2, 0; dead channels (no activation or no weight) keep 1
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(smoothquant_scales(act, weight, 1.0)[:2], act[:2])
    torch.testing.assert_close(smoothquant_scales(act, weight, 0.0)[:2], torch.tensor([1.0, 0.25]))


def _w8a8_output(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    q, _, _ = rtn_quantize(weight, weight_args("w8a8"), torch.float32)
    return quantize_tokens(x, activation_args("w8a8")) @ q.t()


def test_smoothquant_lowers_the_w8a8_error_of_a_layer_with_outlier_inputs():
    """Synthetic activations with a few channels 50x the rest, held-out rows from the same
    distribution: W8A8 of the smoothed layer is closer to the float output than plain W8A8."""
    g = torch.Generator().manual_seed(0)
    gain = torch.ones(128)
    gain[[5, 60, 99]] = 50

    def acts(n):
        return torch.randn(n, 128, generator=g) * gain

    weight = torch.randn(96, 128, generator=g) * 0.05
    calib, held_out = acts(512), acts(512)
    s = smoothquant_scales(calib.abs().amax(0), weight, 0.5)
    ref = held_out @ weight.t()
    plain = (_w8a8_output(weight, held_out) - ref).norm() / ref.norm()
    smoothed = (_w8a8_output(weight * s, held_out / s) - ref).norm() / ref.norm()
    assert smoothed < 0.5 * plain, (smoothed, plain)


@pytest.fixture(scope="module")
def checkpoint(outlier_model):
    return load_float_checkpoint(str(outlier_model))


def _w8a8(checkpoint, method, **kw):
    """The float model quantized by `soar quantize`'s pipeline, and its options."""
    hf = float_model(checkpoint)
    opts = QuantizeOptions(scheme="w8a8", method=method, dtype="float32", progress=False,
                           num_samples=8, seq_len=64, calib="stdlib", **kw)
    compressed, _ = quantize_float_model(hf, checkpoint.tokenizer_dir, opts)
    return hf, compressed, opts


def _logits(model, ids, quantize_inputs=False):
    with torch.no_grad():
        if not quantize_inputs:
            return torch.cat([model(input_ids=row[None]).logits[0] for row in ids])
        with activation_quantization(decoder_linears(model).values(), activation_args("w8a8")):
            return torch.cat([model(input_ids=row[None]).logits[0] for row in ids])


def test_smoothquant_lowers_the_w8a8_logit_error_of_a_model_with_outliers(checkpoint):
    """Calibrated on standard-library source, scored on held-out prose: the W8A8 model
    (int8 weights per channel, int8 activations per token) after SmoothQuant is closer to the
    float model's logits than plain W8A8."""
    held_out = calibration_samples(checkpoint.tokenizer_dir, "prose", 4, 64)
    base = _logits(float_model(checkpoint), held_out)
    errors = {}
    for method in ("rtn", "smoothquant"):
        hf, _, _ = _w8a8(checkpoint, method)
        errors[method] = ((_logits(hf, held_out, True) - base).norm() / base.norm()).item()
    assert errors["smoothquant"] < 0.7 * errors["rtn"], errors


@pytest.mark.parametrize("method", ["rtn", "smoothquant"])
def test_w8a8_checkpoint_loads_in_transformers_with_our_fake_quant_logits(checkpoint, method,
                                                                          tmp_path):
    """transformers loads the file through compressed-tensors (int8 weights, weight_scale, the
    config group's dynamic per-token input_activations, the smoothed norms) and computes the
    logits of our fake-quantized model."""
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM

    hf, compressed, opts = _w8a8(checkpoint, method)
    out = tmp_path / method
    write_directory(out, checkpoint, hf, compressed, opts)
    qc = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"])
    assert qc.format == "int-quantized"
    group = qc.config_groups["group_0"]
    assert group.weights == weight_args("w8a8")
    acts = group.input_activations
    assert (acts.num_bits, acts.type, acts.symmetric, acts.dynamic, acts.strategy) == (
        8, "int", True, True, "token")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    smoothed = method == "smoothquant"
    original = float_model(checkpoint).model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, original) if smoothed else torch.equal(norm, original)

    ids = calibration_samples(checkpoint.tokenizer_dir, "prose", 2, 32)
    ours = _logits(hf, ids, quantize_inputs=True)
    theirs = _logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    weight_only = _logits(hf, ids)  # the activation quantization is really applied on their side
    assert (theirs - weight_only).abs().max() > 1e-3


def test_smoothing_moves_the_outliers_out_of_the_activations(checkpoint):
    """After SmoothQuant the injected channels no longer dominate the q/k/v input."""
    hf = float_model(checkpoint)
    samples = calibration_samples(checkpoint.tokenizer_dir, "prose", 4, 64)
    name = "model.layers.0.self_attn.q_proj"
    before = input_stats(hf, {name: hf.get_submodule(name)}, samples, progress=False)
    mappings = smoothing_mappings(hf)
    observed = {m.balance_names[0]: m.balance[0] for m in mappings}
    stats = input_stats(hf, observed, samples, progress=False)
    smooth(mappings, {n: s.absmax for n, s in stats.stats.items()}, 0.5)
    after = input_stats(hf, {name: hf.get_submodule(name)}, samples, progress=False)

    def ratio(st):
        m = st.stats[name].absmax
        return (m.max() / m.median()).item()

    assert set(before.stats[name].absmax.topk(3).indices.tolist()) == set(OUTLIER_CHANNELS)
    assert ratio(after) < 0.3 * ratio(before), (ratio(before), ratio(after))


def test_fold_scales_into_a_linear_scales_its_rows_and_bias():
    """down <- up style: the previous linear's output channel j divided by s_j."""
    prev, nxt = torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)
    x = torch.randn(5, 8)
    expected = nxt(prev(x))
    from soarllm.quant.smooth import SmoothMapping

    fold_scales(SmoothMapping("prev", prev, ["next"], [nxt]), torch.linspace(0.1, 10, 6))
    torch.testing.assert_close(nxt(prev(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.model
def test_default_model_outliers_and_smoothquant_on_its_worst_layer(default_model_path):
    """The real model's most outlying linear input (a down projection, as in the papers: one
    channel thousands of times its median) comes first in --analyze's list; on held-out text,
    that layer's W8A8 error is lower after smoothing."""
    from soarllm.quant.analyze import outliers

    checkpoint = load_float_checkpoint(str(default_model_path))
    hf = float_model(checkpoint)
    samples = calibration_samples(checkpoint.tokenizer_dir, "prose", 4, 128)
    worst = outliers(input_stats(hf, decoder_linears(hf), samples, progress=False))[0]
    print(f"worst input {worst.name}: max/median {worst.ratio:.0f}, top {worst.top[:3]}")
    assert worst.name.endswith("mlp.down_proj") and worst.ratio > 100
    linear = hf.get_submodule(worst.name)

    def inputs(source):
        caught = []
        handle = linear.register_forward_pre_hook(
            lambda _m, args: caught.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            for row in calibration_samples(checkpoint.tokenizer_dir, source, 4, 128):
                hf.model(input_ids=row[None])  # the decoder alone: no logits needed
        handle.remove()
        return torch.cat(caught)

    calib, held_out = inputs("prose"), inputs("stdlib")
    weight = linear.weight.detach()
    s = smoothquant_scales(calib.abs().amax(0), weight, 0.5)
    ref = held_out @ weight.t()
    plain = ((_w8a8_output(weight, held_out) - ref).norm() / ref.norm()).item()
    smoothed = ((_w8a8_output(weight * s, held_out / s) - ref).norm() / ref.norm()).item()
    print(f"W8A8 relative output error: plain {plain:.4f}, SmoothQuant {smoothed:.4f}")
    assert smoothed < 0.8 * plain
