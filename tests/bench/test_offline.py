"""soar bench offline through LLM on a tiny random model; its JSON feeds soar plan --calibrate."""

from __future__ import annotations

import json

import pytest

from soarllm.cli.main import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-offline"), "llama")


def test_offline_bench_and_calibration(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "offline.json"
    assert main(["bench", "offline", str(tiny_model_dir), "--max-model-len", "256",
                 "--num-prompts", "4", "--input-len", "16", "--output-len", "6",
                 "--batch-sizes", "1,2,4", "--repeats", "2", "--output-json", str(out)]) == 0
    doc = json.loads(out.read_text())
    t = doc["throughput"]
    assert t["num_requests"] == 4 and t["total_output_tokens"] == 24  # ignore_eos: exact lengths
    assert t["total_input_tokens"] == 64
    assert [r["batch_size"] for r in doc["latency_runs"]] == [1, 2, 4]
    for r in doc["latency_runs"]:
        assert r["mean_input_len"] == 16 and r["mean_output_len"] == 6
        assert r["tpot_ms"]["count"] == r["batch_size"]
        assert r["repeats"] == 2 and r["duration_s"] == min(r["durations_s"])
        assert 0 < r["ttft_ms"]["median"] <= r["e2el_ms"]["median"]
    assert "| 4 |" in capsys.readouterr().out
    cfg = tiny_model_dir / "config.json"
    assert main(["plan", "--calibrate", str(out), "--model", str(cfg), "--hardware", "this",
                 "--output-dir", str(tmp_path)]) == 0
    cal = json.loads((tmp_path / "calibration.json").read_text())
    assert len(cal["rows"]) == 3 and cal["mape_percent"]["decode_after"] >= 0
