"""soar bench offline through LLM on a tiny random model; its JSON feeds soar plan --calibrate."""

from __future__ import annotations

import json
import math

import pytest

from soarllm.cli.main import main
from soarllm.plan.calibrate import EFF_MAX_MEASURED, EFF_MIN


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
    # Timings on a busy machine are noisy: assert the calibration's structure and that every
    # number is finite and inside its bounds, never a timing-dependent value.
    def strict(name):
        raise ValueError(f"non-standard JSON constant {name}")

    cal = json.loads((tmp_path / "calibration.json").read_text(), parse_constant=strict)
    assert [r["batch"] for r in cal["rows"]] == [1, 2, 4]
    assert set(cal["mape_percent"]) == {"ttft_before", "ttft_after", "decode_before",
                                        "decode_after"}
    assert all(v >= 0 for v in cal["mape_percent"].values())
    eff = cal["efficiency"]
    assert EFF_MIN <= eff["compute_eff"] <= EFF_MAX_MEASURED
    assert EFF_MIN <= eff["memory_eff"] <= EFF_MAX_MEASURED
    assert eff["step_overhead_s"] >= 0 and eff["seq_overhead_s"] >= 0
    assert all(math.isfinite(r[k]) for r in cal["rows"] for k in r)
    held = cal["held_out"]
    assert (held["fit_batches"], held["held_out_batches"]) == ([1, 4], [2])
    assert all(v >= 0 for v in held["mape_percent"].values())
    assert isinstance(cal["warnings"], list)
