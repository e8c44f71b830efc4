"""Calibration: recovers known efficiency factors, predicts held-out points, never raises.

Identifiability (see soarllm.plan.calibrate): with one input and one output length, TTFT and TPOT
are both affine in the batch size, which fixes only three combinations of the four factors. The
generated data below therefore spans several batch sizes, two input lengths and two output lengths
(prefill attention grows with the square of the input length, decode KV reads with the context),
which determines all four; the test then checks the factors themselves, not just the fit.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from soarllm.plan.calibrate import (
    EFF_MAX,
    EFF_MIN,
    Observation,
    calibrate,
    fit_efficiency,
    observations_from_results,
    predict,
    render_calibration,
)
from soarllm.plan.hardware import Efficiency, Hardware
from soarllm.plan.model_shape import load_model_shape
from soarllm.plan.roofline import Precision

CPU = Hardware("this", "cpu", memory_gib=16, memory_bw_gbs=20, tflops={"fp32": 0.1},
               default_dtype="fp32",
               efficiency=Efficiency(1.0, 1.0, 1.0, 0.0, 0.0, True))
MODEL = load_model_shape("SmolLM2-135M")
FP32 = Precision.make("fp32")
BATCHES = (1, 2, 4, 8, 16, 32, 64)
SERIAL = Efficiency(compute_eff=0.3, memory_eff=0.5, comm_eff=1.0, step_overhead_s=0.02,
                    seq_overhead_s=0.001, overlap=False)
OVERLAPPED = Efficiency(compute_eff=0.4, memory_eff=0.6, comm_eff=1.0, step_overhead_s=0.005,
                        seq_overhead_s=0.0005, overlap=True)


def generated(truth: Efficiency, batches=BATCHES, input_lens=(32, 256), output_lens=(16, 128),
              scale: float = 1.0) -> list[Observation]:
    """Observations the roofline predicts under ``truth`` (times multiplied by ``scale``)."""
    obs = []
    for b in batches:
        for i in input_lens:
            for o in output_lens:
                p = predict(MODEL, CPU, FP32, truth, Observation(b, i, o, 1.0, 1.0))
                obs.append(Observation(b, i, o, p.ttft_s * scale, p.tpot_s * scale))
    return obs


@pytest.mark.parametrize("truth", [SERIAL, OVERLAPPED], ids=["serialised", "overlapped"])
def test_fit_recovers_known_factors_and_predicts_held_out_lengths(truth):
    fit = fit_efficiency(MODEL, CPU, FP32, generated(truth))
    got = fit.efficiency
    assert got.overlap == truth.overlap
    assert got.compute_eff == pytest.approx(truth.compute_eff, rel=1e-3)
    assert got.memory_eff == pytest.approx(truth.memory_eff, rel=1e-3)
    assert got.step_overhead_s == pytest.approx(truth.step_overhead_s, rel=1e-3)
    assert got.seq_overhead_s == pytest.approx(truth.seq_overhead_s, rel=1e-3)
    assert fit.warnings == [] and fit.rms_log_error < 1e-6
    # Lengths and batch sizes the fit never saw.
    for b, i, o in [(3, 1024, 64), (48, 8, 512), (128, 512, 8)]:
        want = predict(MODEL, CPU, FP32, truth, Observation(b, i, o, 1.0, 1.0))
        have = predict(MODEL, CPU, FP32, got, Observation(b, i, o, 1.0, 1.0))
        assert have.ttft_s == pytest.approx(want.ttft_s, rel=1e-3)
        assert have.tpot_s == pytest.approx(want.tpot_s, rel=1e-3)


def test_one_length_fits_the_data_but_warns_that_factors_are_undetermined():
    obs = generated(SERIAL, input_lens=(64,), output_lens=(32,))
    rep = calibrate(MODEL, CPU, FP32, obs)
    assert rep.mape["ttft_after"] < 1.0 and rep.mape["decode_after"] < 1.0
    assert rep.mape["decode_before"] > 20.0  # the uncalibrated machine figures are far off
    assert any("cannot tell" in w and "memory_eff" in w for w in rep.warnings)


def test_held_out_check_fits_some_batch_sizes_and_reports_the_others():
    rep = calibrate(MODEL, CPU, FP32, generated(SERIAL))
    h = rep.held_out
    assert h is not None
    assert (h.fit_batches, h.held_out_batches) == ([1, 4, 16, 64], [2, 8, 32])
    assert h.mape["ttft"] < 1e-3 and h.mape["decode"] < 1e-3
    # Held-out points measured twice as slow as the truth: the fit never sees them, so the
    # held-out error is |t - 2t| / 2t = 50 % for TTFT and |B/t - B/2t| / (B/2t) = 100 % for
    # decode throughput.
    obs = [Observation(o.batch, o.input_len, o.output_len, 2 * o.ttft_s, 2 * o.tpot_s)
           if o.batch in (2, 8, 32) else o for o in generated(SERIAL)]
    h = calibrate(MODEL, CPU, FP32, obs).held_out
    assert h.mape["ttft"] == pytest.approx(50.0, abs=0.1)
    assert h.mape["decode"] == pytest.approx(100.0, abs=0.2)
    text = render_calibration(calibrate(MODEL, CPU, FP32, generated(SERIAL)), MODEL, CPU)
    assert "Held-out check (fit on batch sizes 1, 4, 16, 64; predict 2, 8, 32)" in text


def test_mild_noise_keeps_held_out_error_small():
    rng = np.random.default_rng(0)
    obs = [Observation(o.batch, o.input_len, o.output_len,
                       o.ttft_s * math.exp(rng.normal(0, 0.02)),
                       o.tpot_s * math.exp(rng.normal(0, 0.02))) for o in generated(SERIAL)]
    rep = calibrate(MODEL, CPU, FP32, obs)
    assert rep.held_out.mape["ttft"] < 10 and rep.held_out.mape["decode"] < 10
    assert rep.after.compute_eff == pytest.approx(SERIAL.compute_eff, rel=0.2)


def _noisy() -> list[Observation]:
    rng = np.random.default_rng(1)
    return [Observation(o.batch, o.input_len, o.output_len,
                        o.ttft_s * math.exp(rng.normal(0, 1.0)),
                        o.tpot_s * math.exp(rng.normal(0, 1.0)))
            for o in generated(SERIAL, input_lens=(64,), output_lens=(32,))]


ADVERSARIAL = {
    "noisy": _noisy(),
    "constant": [Observation(b, 64, 32, 0.1, 0.1) for b in BATCHES],
    "one point": [Observation(4, 64, 32, 0.3, 0.05)],
    "wildly slow": generated(SERIAL, scale=1e7),
    "wildly fast": generated(SERIAL, scale=1e-9),
    "huge span": [Observation(1, 64, 32, 1e-300, 1e300), Observation(2, 64, 32, 1e300, 1e-300),
                  Observation(4, 64, 32, 0.1, 0.01)],
    "zeros and NaN": [Observation(1, 64, 32, 0.0, 0.1), Observation(2, 64, 32, math.nan, 0.1),
                      Observation(4, 64, 32, math.inf, -1.0), Observation(0, 0, 0, 0.1, 0.1),
                      Observation(8, -1, 32, 0.1, 0.1)],
    "some unusable": [Observation(1, 64, 32, 0.0, 0.02), Observation(2, 64, 32, 0.2, 0.03),
                      Observation(4, 64, 32, 0.35, math.nan), Observation(8, 64, 32, 0.7, 0.05)],
    "empty": [],
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_adversarial_data_gets_a_fit_and_warnings_never_an_exception(case):
    obs = ADVERSARIAL[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings either
        rep = calibrate(MODEL, CPU, FP32, obs)
        text = render_calibration(rep, MODEL, CPU)
    eff = rep.after
    assert rep.warnings and "Warnings:" in text
    assert EFF_MIN * (1 - 1e-9) <= eff.compute_eff <= EFF_MAX * (1 + 1e-9)
    assert EFF_MIN * (1 - 1e-9) <= eff.memory_eff <= EFF_MAX * (1 + 1e-9)
    longest = max((t for o in rep.observations for t in (o.ttft_s, o.tpot_s)), default=0.0)
    for overhead in (eff.step_overhead_s, eff.seq_overhead_s):
        assert math.isfinite(overhead) and 0.0 <= overhead <= longest * (1 + 1e-9)
    assert all(math.isfinite(r["ttft_after_ms"]) and r["ttft_after_ms"] > 0 for r in rep.rows)


def test_unusable_observations_are_dropped_with_a_warning_each():
    rep = calibrate(MODEL, CPU, FP32, ADVERSARIAL["zeros and NaN"])
    assert rep.rows == [] and rep.after == CPU.efficiency
    assert sum("dropped observation" in w for w in rep.warnings) == 5
    assert any("no usable observation" in w for w in rep.warnings)


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
         "ttft_ms": {"median": 50.0}, "tpot_ms": {"median": 10.0}},
        {"batch_size": 2, "mean_input_len": None, "mean_output_len": "x",
         "ttft_ms": {"median": float("nan")}, "tpot_ms": None}]}
    bad, o = observations_from_results(offline)
    assert o.decode_tokens_per_s == pytest.approx(800)
    assert bad.batch == 2 and bad.input_len == -1 and math.isnan(bad.ttft_s)


def _catalog(tmp_path):
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"hardware": [{
        "id": "cpu", "name": "cpu", "memory_gib": 16, "memory_bw_gbs": 20,
        "tflops": {"fp32": 0.1}, "default_dtype": "fp32"}]}))
    return catalog


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_cli_calibrate(tmp_path, capsys):
    from soarllm.cli.main import main

    path = tmp_path / "results.json"
    path.write_text(json.dumps(_serve_doc()))
    code = main(["plan", "--calibrate", str(path), "--model", "SmolLM2-135M", "--catalog",
                 str(_catalog(tmp_path)), "--hardware", "cpu", "--output-dir", str(tmp_path)])
    assert code == 0
    out = _strict_json(tmp_path / "calibration.json")
    assert out["hardware"] == "cpu" and set(out["mape_percent"]) == {
        "ttft_before", "ttft_after", "decode_before", "decode_after"}
    assert out["held_out"] is None  # two batch sizes: too few to hold one out
    captured = capsys.readouterr()
    assert "MAPE after calibration" in captured.out
    assert "soar plan: warning: no held-out check" in captured.err


def test_cli_calibrate_on_noisy_results_warns_instead_of_failing(tmp_path, capsys):
    from soarllm.cli.main import main

    runs = [{"batch_size": o.batch, "mean_input_len": o.input_len,
             "mean_output_len": o.output_len, "ttft_ms": {"median": o.ttft_s * 1e3},
             "tpot_ms": {"median": o.tpot_s * 1e3}} for o in _noisy()]
    runs += [{"batch_size": 3, "mean_input_len": 64, "mean_output_len": 32,
              "ttft_ms": {"median": float("nan")}, "tpot_ms": {"median": 0.0}}]
    path = tmp_path / "offline.json"
    path.write_text(json.dumps({"schema": "soarllm.bench.offline/1", "latency_runs": runs}))
    code = main(["plan", "--calibrate", str(path), str(path), "--model", "SmolLM2-135M",
                 "--catalog", str(_catalog(tmp_path)), "--hardware", "cpu",
                 "--output-dir", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "soar plan: warning: poor fit" in err and "dropped observation batch=3" in err
    assert "Traceback" not in err
    out = _strict_json(tmp_path / "calibration.json")
    assert out["held_out"]["held_out_batches"] == [2, 8, 32]
    assert all(math.isfinite(v) for v in out["efficiency"].values() if not isinstance(v, bool))


def test_cli_calibrate_on_a_file_that_is_not_json(tmp_path, capsys):
    from soarllm.cli.main import main

    path = tmp_path / "results.json"
    path.write_text("not json")
    assert main(["plan", "--calibrate", str(path), "--model", "SmolLM2-135M", "--catalog",
                 str(_catalog(tmp_path)), "--hardware", "cpu"]) == 1
    assert "is not JSON" in capsys.readouterr().err
