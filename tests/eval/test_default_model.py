"""soar eval on the default model (SmolLM2-135M-Instruct, pulled by `soar pull`)."""

from __future__ import annotations

import json

import pytest

from soarllm.cli.main import main

pytestmark = pytest.mark.model


def test_eval_default_model(tmp_path, capsys):
    ppl_json = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--corpus", "stdlib,prose", "--max-tokens", "256",
                 "--window", "128", "--stride", "64", "--output-json", str(ppl_json)]) == 0
    results = {r["corpus"]: r for r in json.loads(ppl_json.read_text())["results"]}
    # A trained model is far below a uniform guess over its 49152-token vocabulary, and code
    # (repetitive, predictable) is easier than prose for it.
    assert 1.5 < results["stdlib"]["perplexity"] < 30
    assert 3 < results["prose"]["perplexity"] < 100
    he_json = tmp_path / "he.json"
    assert main(["eval", "humaneval", "--limit", "2", "--max-new-tokens", "64",
                 "--output-json", str(he_json)]) == 0
    he = json.loads(he_json.read_text())
    assert he["num_problems"] == 2 and 0.0 <= he["pass_at"]["pass@1"] <= 1.0
    assert all(p["statuses"][0] in ("passed", "failed", "timeout") for p in he["problems"])
    assert "HumanEval (2 problems" in capsys.readouterr().out
