"""Calibration recovers known efficiency factors from observations the roofline generated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from soarllm.plan.calibrate import (
    Observation,
    calibrate,
    nelder_mead,
    observations_from_results,
    predict,
)
from soarllm.plan.hardware import Efficiency, Hardware
from soarllm.plan.model_shape import load_model_shape
from soarllm.plan.roofline import Precision

CPU = Hardware("this", "cpu", memory_gib=16, memory_bw_gbs=20, tflops={"fp32": 0.1},
               default_dtype="fp32",
               efficiency=Efficiency(1.0, 1.0, 1.0, 0.0, 0.0, True))


def test_nelder_mead_finds_a_quadratic_minimum():
    x, value = nelder_mead(lambda x: float(((x - np.array([1.0, -2.0])) ** 2).sum()),
                           np.zeros(2))
    assert x == pytest.approx([1.0, -2.0], abs=1e-3) and value < 1e-6


def test_calibration_recovers_generated_observations():
    model = load_model_shape("SmolLM2-135M")
    precision = Precision.make("fp32")
    truth = Efficiency(compute_eff=0.3, memory_eff=0.5, comm_eff=1.0, step_overhead_s=0.02,
                       seq_overhead_s=0.001, overlap=False)
    obs = []
    for b in (1, 2, 4, 8, 16, 32, 64):
        o = Observation(b, 64, 32, 1.0, 1.0)
        p = predict(model, CPU, precision, truth, o)
        obs.append(Observation(b, 64, 32, p.ttft_s, p.tpot_s))
    rep = calibrate(model, CPU, precision, obs)
    assert rep.mape["ttft_after"] < 2.0 and rep.mape["decode_after"] < 2.0
    assert rep.mape["decode_before"] > 20.0  # the uncalibrated machine figures are far off
    assert len(rep.rows) == 7


def _serve_doc() -> dict:
    def run(c, rate="inf"):
        return {"load": {"request_rate": rate, "max_concurrency": c},
                "metrics": {"completed": c, "num_requests": c, "mean_input_len": 64.2,
                            "mean_output_len": 32.0, "ttft_ms": {"median": 100.0 * c},
                            "tpot_ms": {"median": 20.0}}}
    return {"schema": "soarllm.bench.serve/1",
            "endpoints": [{"runs": [run(4), run(1), run(2, rate=1.0)]}]}


def test_observations_from_serve_and_offline_results():
    obs = observations_from_results(_serve_doc())
    assert [(o.batch, o.input_len, o.ttft_s, o.tpot_s) for o in obs] == [
        (1, 64, 0.1, 0.02), (4, 64, 0.4, 0.02)]
    offline = {"schema": "soarllm.bench.offline/1", "latency_runs": [
        {"batch_size": 8, "mean_input_len": 64, "mean_output_len": 32,
         "ttft_ms": {"median": 50.0}, "tpot_ms": {"median": 10.0}}]}
    (o,) = observations_from_results(offline)
    assert o.decode_tokens_per_s == pytest.approx(800)


def test_cli_calibrate(tmp_path, capsys):
    from soarllm.cli.main import main

    path = tmp_path / "results.json"
    path.write_text(json.dumps(_serve_doc()))
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"hardware": [{
        "id": "cpu", "name": "cpu", "memory_gib": 16, "memory_bw_gbs": 20,
        "tflops": {"fp32": 0.1}, "default_dtype": "fp32"}]}))
    code = main(["plan", "--calibrate", str(path), "--model", "SmolLM2-135M", "--catalog",
                 str(catalog), "--hardware", "cpu", "--output-dir", str(tmp_path)])
    assert code == 0
    out = json.loads((tmp_path / "calibration.json").read_text())
    assert out["hardware"] == "cpu" and set(out["mape_percent"]) == {
        "ttft_before", "ttft_after", "decode_before", "decode_after"}
    assert "MAPE after calibration" in capsys.readouterr().out
