"""`soar compare`: the per-layer hidden states it catches are transformers' (output_hidden_states
of the same weights), its per-layer cosines and errors are those computed from transformers'
states of the two models, a model compared with itself shows no drift, and the CLI reports the
table, the first drifting layer and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from soarllm.cli.main import main
from soarllm.quant.compare import compare_models, load_model, run_layers
from tests.tiny import make_tiny_model

PROMPTS = [[5, 17, 99, 230, 41, 8, 300, 12, 77, 140, 61, 2], [400, 33, 7, 123, 64, 250, 19, 88]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    fp = make_tiny_model(root / "fp", "llama", num_hidden_layers=4)
    q = root / "w4"
    assert main(["quantize", str(fp), "--scheme", "w4a16", "--group-size", "32", "--dtype",
                 "float32", "--out", str(q), "--no-progress"]) == 0
    return fp, q


def _hf_states(path, ids, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    # hidden_states[i + 1] is decoder layer i's output; the last one has the final norm applied
    return [h[0] for h in out.hidden_states[1:-1]], out.logits[0]


def _dequantize():
    from transformers import CompressedTensorsConfig

    return CompressedTensorsConfig(dequantize=True)


def test_hooked_states_are_transformers_hidden_states(models):
    fp, _ = models
    model, _, _ = load_model(str(fp))
    states, logits = run_layers(model, PROMPTS[0])
    ref, ref_logits = _hf_states(fp, PROMPTS[0])
    assert len(states) == 4
    for i, r in enumerate(ref):
        torch.testing.assert_close(states[i], r, rtol=1e-4, atol=1e-4, msg=f"layer {i}")
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_a_model_compared_with_itself_does_not_drift(models):
    fp, _ = models
    a, _, _ = load_model(str(fp))
    b, _, _ = load_model(str(fp))
    r = compare_models(a, b, PROMPTS, threshold=0.999999)
    assert r.first_drift_layer is None
    assert all(d.max_abs == 0 and d.cosine_min > 0.99999 for d in r.layers)
    assert r.top1_agreement == 1 and r.topk_agreement == 1


def test_per_layer_figures_match_transformers_states(models):
    fp, q = models
    a, _, _ = load_model(str(fp))
    b, _, _ = load_model(str(q), "none")  # dequantized in float32, as transformers runs it
    r = compare_models(a, b, PROMPTS, threshold=0.99, k=5)
    want_cos, want_max, want_mean = [], [], []
    for ids in PROMPTS:
        sa, la = _hf_states(fp, ids)
        sb, lb = _hf_states(q, ids, quantization_config=_dequantize())
        want_cos.append(torch.stack([F.cosine_similarity(x, y, dim=-1) for x, y in zip(sa, sb)]))
        want_max.append(torch.stack([(x - y).abs().amax(-1) for x, y in zip(sa, sb)]))
        want_mean.append(torch.stack([(x - y).abs().mean(-1) for x, y in zip(sa, sb)]))
    cos, mx, mean = (torch.cat(w, dim=1) for w in (want_cos, want_max, want_mean))
    for i in range(3):  # transformers gives the last layer's state after the final norm
        assert r.layers[i].cosine_mean == pytest.approx(cos[i].mean().item(), abs=1e-5)
        assert r.layers[i].cosine_min == pytest.approx(cos[i].min().item(), abs=1e-5)
        assert r.layers[i].max_abs == pytest.approx(mx[i].max().item(), rel=1e-3, abs=1e-5)
        assert r.layers[i].mean_abs == pytest.approx(mean[i].mean().item(), rel=1e-3, abs=1e-6)
    # the first drift is where transformers' cosines first fall below a threshold between them
    means = [r.layers[i].cosine_mean for i in range(4)]
    t = (max(means) + min(means)) / 2
    again = compare_models(a, b, PROMPTS, threshold=t)
    assert again.first_drift_layer == next(i for i, m in enumerate(means) if m < t)
    assert 0 < r.top1_agreement <= 1


def test_cli_reports_table_and_json(models, tmp_path, capsys):
    fp, q = models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def parse(argv):\n\nimport json\n")
    out = tmp_path / "cmp.json"
    assert main(["compare", str(fp), str(q), "--prompts", str(prompts), "--threshold", "1.0",
                 "--output-json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 0 |" in text and "<- first drift" in text
    doc = json.loads(out.read_text())
    assert len(doc["layers"]) == 4 and doc["first_drift_layer"] == 0


def test_cli_errors(models, tmp_path, capsys):
    fp, q = models
    assert main(["compare", str(fp), str(q), "--prompts", str(tmp_path / "nope.txt")]) == 1
    assert "is not a file" in capsys.readouterr().err
    assert main(["compare", str(fp), str(q), "--threshold", "2"]) == 1
    assert "--threshold 2.0 must be in (0, 1]" in capsys.readouterr().err
    other = make_tiny_model(tmp_path / "other", "llama", num_hidden_layers=2)
    assert main(["compare", str(fp), str(other)]) == 1
    assert "4 and 2 decoder layers" in capsys.readouterr().err
