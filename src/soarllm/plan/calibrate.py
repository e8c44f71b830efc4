"""Fit the roofline's efficiency factors to soar bench results, and report prediction error.

Observations are (batch, input length, output length, measured TTFT, measured TPOT): from
``soar bench offline`` (a batch of prompts submitted together) or from ``soar bench serve`` runs at
a fixed concurrency with every request sent at once (batch = concurrency). The medians are used.

The fit is ``scipy.optimize.least_squares`` (trust-region reflective, bounded) over four physically
meaningful parameters: compute_eff and memory_eff in [EFF_MIN, EFF_MAX] (fitted in log space),
step_overhead_s and seq_overhead_s in [0, the longest measured step]. The residuals are
log(predicted / measured) for every TTFT and TPOT. It runs once with compute and memory overlapped
(max) and once serialised (sum) from a few starting points, and keeps the better fit.

What the data can pin down (see ``Fit.warnings``): a prefill step costs
``a F + b M + step_overhead + B seq_overhead`` (sum mode) with ``a = 1 / (peak compute_eff)``,
``b = 1 / (bandwidth memory_eff)``. With a single input and output length, F and M grow
linearly with the batch B in both TTFT and TPOT, so the measurements fix three combinations of
the four parameters, and compute and memory efficiency cannot be told apart. Observations at
several batch sizes *and* several input lengths (the prefill attention FLOPs grow with the square
of the length, the KV reads of a decode step with the context) make all four identifiable. The fit
checks this on the Jacobian at its solution and warns when a direction is undetermined.

The fit never raises on bad data: unusable observations (zero, negative or non-finite times or
lengths) are dropped with a warning, and whatever remains gets a fit plus warnings (poor fit,
a factor stopped at its bound, factors the data cannot separate). Error is reported as MAPE (mean
absolute percentage error), in-sample and on batch sizes held out of the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from soarllm.errors import InvalidRequestError
from soarllm.plan.hardware import Efficiency, Hardware
from soarllm.plan.model_shape import ModelShape
from soarllm.plan.roofline import Precision, Roofline

EFF_MIN = 1e-5
EFF_MAX = 1.5  # catalog peaks are datasheet figures: a little slack for boost clocks, rounding
# An on-the-spot measurement (a 1024^2 matmul, a copy) under-reads this machine's peak when the
# machine is busy (seen: 6x on a shared 2-core machine), so the engine may beat it by several
# times; factors above EFF_MAX on measured hardware are fitted but come with a warning.
EFF_MAX_MEASURED = 16.0
POOR_FIT_RMS_LOG = 0.2  # a typical error above ~20 % is reported as a poor fit
PARAMS = ("compute_eff", "memory_eff", "step_overhead_s", "seq_overhead_s")


@dataclass(frozen=True)
class Observation:
    batch: int
    input_len: int
    output_len: int
    ttft_s: float
    tpot_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / self.tpot_s if self.tpot_s > 0 else math.nan


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _length(x: Any) -> int:
    v = _num(x)
    return round(v) if math.isfinite(v) else -1


def observations_from_results(doc: dict[str, Any]) -> list[Observation]:
    """Observations from a soar bench JSON document (serve or offline). Missing or non-numeric
    values become NaN / -1, which ``calibrate`` drops with a warning."""
    obs: list[Observation] = []
    schema = str(doc.get("schema", "")) if isinstance(doc, dict) else ""
    if schema.startswith("soarllm.bench.offline"):
        for run in doc.get("latency_runs", []):
            obs.append(Observation(
                batch=_length(run.get("batch_size")),
                input_len=_length(run.get("mean_input_len")),
                output_len=_length(run.get("mean_output_len")),
                ttft_s=_num((run.get("ttft_ms") or {}).get("median")) / 1e3,
                tpot_s=_num((run.get("tpot_ms") or {}).get("median")) / 1e3,
            ))
    elif schema.startswith("soarllm.bench.serve"):
        for ep in doc.get("endpoints", [])[:1]:
            for run in ep.get("runs", []):
                load, m = run.get("load", {}), run.get("metrics", {})
                if load.get("request_rate") != "inf" or not m.get("completed"):
                    continue  # only all-at-once runs have a well-defined batch
                obs.append(Observation(
                    batch=_length(load.get("max_concurrency") or m.get("num_requests")),
                    input_len=_length(m.get("mean_input_len")),
                    output_len=_length(m.get("mean_output_len")),
                    ttft_s=_num((m.get("ttft_ms") or {}).get("median")) / 1e3,
                    tpot_s=_num((m.get("tpot_ms") or {}).get("median")) / 1e3,
                ))
    else:
        raise InvalidRequestError(f"not a soar bench result (schema {schema!r})")
    if not obs:
        raise InvalidRequestError(
            "the results hold no usable run: calibrate from `soar bench offline` or from "
            "`soar bench serve --concurrency ...` runs without --request-rate"
        )
    return sorted(obs, key=lambda o: o.batch)


def usable_observations(obs: list[Observation]) -> tuple[list[Observation], list[str]]:
    """The observations a fit can use, and a warning for each one dropped."""
    keep, warnings = [], []
    for o in obs:
        times_ok = all(math.isfinite(t) and t > 0 for t in (o.ttft_s, o.tpot_s))
        if o.batch >= 1 and o.input_len >= 1 and o.output_len >= 0 and times_ok:
            keep.append(o)
        else:
            warnings.append(
                f"dropped observation batch={o.batch} in={o.input_len} out={o.output_len} "
                f"TTFT={o.ttft_s!r} s TPOT={o.tpot_s!r} s: times must be finite and positive, "
                "batch and input length at least 1")
    return keep, warnings


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tpot_s: float


def predict(model: ModelShape, hw: Hardware, precision: Precision, eff: Efficiency,
            o: Observation) -> Prediction:
    rf = Roofline(model, hw, precision, 1, eff)
    return Prediction(rf.ttft(o.batch, o.input_len).time_s,
                      rf.tpot(o.batch, o.input_len, o.output_len).time_s)


def mape(predicted: list[float], measured: list[float]) -> float:
    """Mean absolute percentage error; NaN when there is nothing to compare."""
    pairs = [(p, m) for p, m in zip(predicted, measured) if m and math.isfinite(m)]
    if not pairs:
        return math.nan
    return 100.0 * float(np.mean([abs(p - m) / abs(m) for p, m in pairs]))


@dataclass(frozen=True)
class _Steps:
    """The efficiency-free parts of every TTFT and TPOT step of the observations: compute and
    memory time at efficiency 1, communication time, sequences in the step, measured time."""

    compute_s: np.ndarray
    memory_s: np.ndarray
    comm_s: np.ndarray
    seqs: np.ndarray
    measured_s: np.ndarray

    @classmethod
    def of(cls, model: ModelShape, hw: Hardware, precision: Precision,
           obs: list[Observation]) -> _Steps:
        unit = Efficiency(1.0, 1.0, hw.efficiency.comm_eff, 0.0, 0.0, True)
        rf = Roofline(model, hw, precision, 1, unit)
        costs, seqs, measured = [], [], []
        for o in obs:
            costs += [rf.ttft(o.batch, o.input_len), rf.tpot(o.batch, o.input_len, o.output_len)]
            seqs += [o.batch, o.batch]
            measured += [o.ttft_s, o.tpot_s]
        return cls(np.array([c.compute_s for c in costs]), np.array([c.memory_s for c in costs]),
                   np.array([c.comm_s for c in costs]), np.array(seqs, dtype=float),
                   np.array(measured, dtype=float))


class _Model:
    """Step times as a function of x = (ln compute_eff, ln memory_eff, step_overhead / t_ref,
    seq_overhead / t_ref), with its analytic Jacobian of log(time)."""

    def __init__(self, steps: _Steps, overlap: bool, t_ref: float):
        self.s, self.overlap, self.t_ref = steps, overlap, t_ref

    def _parts(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        compute = self.s.compute_s / math.exp(x[0])
        memory = self.s.memory_s / math.exp(x[1])
        if self.overlap:
            core = np.maximum(compute, memory)
        else:
            core = compute + memory
        time = core + self.s.comm_s + (x[2] + self.s.seqs * x[3]) * self.t_ref
        return compute, memory, time

    def residuals(self, x: np.ndarray) -> np.ndarray:
        return np.log(self._parts(x)[2]) - np.log(self.s.measured_s)

    def jacobian(self, x: np.ndarray) -> np.ndarray:
        compute, memory, time = self._parts(x)
        if self.overlap:
            compute_binds = compute >= memory
            d_compute, d_memory = np.where(compute_binds, -compute, 0.0), np.where(
                compute_binds, 0.0, -memory)
        else:
            d_compute, d_memory = -compute, -memory
        cols = [d_compute, d_memory, np.full_like(time, self.t_ref), self.s.seqs * self.t_ref]
        return np.stack(cols, axis=1) / time[:, None]


@dataclass
class Fit:
    efficiency: Efficiency
    rms_log_error: float  # root mean square of log(predicted / measured); NaN: nothing fitted
    warnings: list[str] = field(default_factory=list)


def _eff_max(hw: Hardware) -> float:
    return EFF_MAX_MEASURED if hw.vendor == "measured" else EFF_MAX


def _undetermined(jac: np.ndarray) -> list[str]:
    """Warnings for parameters (or combinations) the Jacobian says the data cannot fix."""
    norms = np.linalg.norm(jac, axis=0)
    if not np.all(np.isfinite(jac)) or norms.max(initial=0.0) == 0:
        return ["the fit could not assess which factors the data determines"]
    dead = [PARAMS[i] for i in range(len(PARAMS)) if norms[i] <= 1e-9 * norms.max()]
    out = []
    if dead:
        out.append(f"{', '.join(dead)}: no effect on any predicted step at the fit (e.g. memory "
                   "never limits a step when compute and memory overlap), so the data does not "
                   "determine it")
    live = [i for i in range(len(PARAMS)) if PARAMS[i] not in dead]
    scaled = jac[:, live] / norms[live]
    _, sv, vt = np.linalg.svd(scaled, full_matrices=True)
    sv = np.concatenate([sv, np.zeros(len(live) - len(sv))])
    tied = sorted({live[i] for k in np.nonzero(sv <= 1e-6 * sv.max())[0]
                   for i in np.nonzero(np.abs(vt[k]) > 0.2)[0]})
    if tied:
        out.append(f"the observations cannot tell {', '.join(PARAMS[i] for i in tied)} apart "
                   "(many factor sets fit equally well): measure several batch sizes and several "
                   "input or output lengths to pin them down")
    return out


def fit_efficiency(model: ModelShape, hw: Hardware, precision: Precision,
                   obs: list[Observation]) -> Fit:
    """The efficiency factors that best explain the observations; never raises on bad data."""
    base = hw.efficiency
    usable, warnings = usable_observations(obs)
    if not usable:
        return Fit(base, math.nan, [*warnings, "no usable observation: kept the hardware's own "
                                    "efficiency factors"])
    steps = _Steps.of(model, hw, precision, usable)
    measured = steps.measured_s
    t_ref = float(np.exp(np.median(np.log(measured))))
    eff_max = _eff_max(hw)
    over_max = float(min(measured.max() / t_ref, 1e12))  # an overhead cannot exceed a whole step
    lo = np.array([math.log(EFF_MIN), math.log(EFF_MIN), 0.0, 0.0])
    hi = np.array([math.log(eff_max), math.log(eff_max), over_max, over_max])
    min_step = float(measured.min()) / t_ref

    def start(ce: float, me: float, so: float, sq: float) -> np.ndarray:
        x = np.array([math.log(max(ce, EFF_MIN)), math.log(max(me, EFF_MIN)), so, sq])
        return np.clip(x, lo, np.nextafter(hi, -np.inf))

    starts = [
        start(base.compute_eff, base.memory_eff, base.step_overhead_s / t_ref,
              base.seq_overhead_s / t_ref),
        start(0.5, 0.5, 0.1 * min_step, 0.0),
        start(0.05, 0.05, 0.01 * min_step, 0.01 * min_step),
        start(1.0, 0.1, 0.0, 0.0),
    ]
    best: tuple[float, np.ndarray, _Model] | None = None
    failures = []
    for overlap in (base.overlap, not base.overlap):
        fm = _Model(steps, overlap, t_ref)
        for x0 in starts:
            try:
                with np.errstate(all="ignore"):
                    res = least_squares(fm.residuals, x0, jac=fm.jacobian, bounds=(lo, hi),
                                        method="trf", x_scale="jac", ftol=1e-12, xtol=1e-12,
                                        gtol=1e-12, max_nfev=500)
            except (ValueError, FloatingPointError, np.linalg.LinAlgError) as e:
                failures.append(str(e))
                continue
            if not np.isfinite(res.cost):
                continue
            # Strictly better only: ties keep the earlier start (the hardware's own factors).
            if best is None or res.cost < best[0] * (1 - 1e-9) - 1e-30:
                best = (float(res.cost), res.x, fm)
    if best is None:
        return Fit(base, math.nan, [*warnings, "the fit failed (" + "; ".join(failures[:1]) +
                                    "): kept the hardware's own efficiency factors"])
    cost, x, fm = best
    x = x.copy()
    x[2:] = np.where(x[2:] < 1e-9, 0.0, x[2:])  # overheads below a billionth of a step are zero
    eff = replace(base, compute_eff=float(math.exp(x[0])), memory_eff=float(math.exp(x[1])),
                  step_overhead_s=float(x[2] * t_ref), seq_overhead_s=float(x[3] * t_ref),
                  overlap=fm.overlap)
    rms = math.sqrt(2 * cost / len(measured))
    if rms > POOR_FIT_RMS_LOG:
        warnings.append(
            f"poor fit: predictions are off by a typical factor of {math.exp(min(rms, 700)):.3g} "
            f"(RMS log error {rms:.3g}): the timings look noisy or this engine is not roofline-shaped; rerun the "
            "benchmark on an idle machine with more --repeats")
    for i, name in enumerate(PARAMS[:2]):
        if hw.vendor == "measured" and EFF_MAX < math.exp(x[i]) < eff_max * (1 - 1e-6):
            warnings.append(f"{name}={math.exp(x[i]):.3g}: the engine beat this machine's "
                            "on-the-spot measurement, which under-reads the peak when the machine "
                            "is busy; measure and benchmark under the same load")
        if x[i] >= hi[i] - 1e-6:
            warnings.append(f"{name} stopped at its upper bound {eff_max:g}: the measured steps "
                            "are faster than this hardware's figures allow (wrong --hardware or "
                            "--dtype?)")
        elif x[i] <= lo[i] + 1e-6:
            warnings.append(f"{name} stopped at its lower bound {EFF_MIN:g}: the measured steps "
                            "are far slower than this hardware's figures (wrong --hardware?)")
    for i, name in enumerate(PARAMS[2:], start=2):
        if x[i] >= hi[i] * (1 - 1e-6):
            warnings.append(f"{name} reached the longest measured step: the data is not "
                            "explained by the roofline (check the measurements)")
    warnings += _undetermined(fm.jacobian(x))
    return Fit(eff, rms, warnings)


@dataclass
class HeldOut:
    """Error on batch sizes left out of the fit, predicted by a fit on the others."""

    fit_batches: list[int]
    held_out_batches: list[int]
    efficiency: Efficiency
    mape: dict[str, float]  # "ttft", "decode"

    def to_dict(self) -> dict[str, Any]:
        return {"fit_batches": self.fit_batches, "held_out_batches": self.held_out_batches,
                "efficiency": self.efficiency.to_dict(), "mape_percent": self.mape}


def held_out_check(model: ModelShape, hw: Hardware, precision: Precision,
                   obs: list[Observation]) -> HeldOut | None:
    """Fit on every other batch size (smallest and, with an odd count, largest included) and
    report MAPE on the rest; None with fewer than three batch sizes."""
    batches = sorted({o.batch for o in obs})
    if len(batches) < 3:
        return None
    held = set(batches[1::2])
    train = [o for o in obs if o.batch not in held]
    test = [o for o in obs if o.batch in held]
    eff = fit_efficiency(model, hw, precision, train).efficiency
    preds = [predict(model, hw, precision, eff, o) for o in test]
    return HeldOut(
        fit_batches=sorted({o.batch for o in train}), held_out_batches=sorted(held),
        efficiency=eff,
        mape={"ttft": mape([p.ttft_s for p in preds], [o.ttft_s for o in test]),
              "decode": mape([o.batch / p.tpot_s for o, p in zip(test, preds)],
                             [o.decode_tokens_per_s for o in test])})


@dataclass
class CalibrationReport:
    observations: list[Observation]  # the usable ones
    before: Efficiency
    after: Efficiency
    rows: list[dict[str, float]]
    mape: dict[str, float]  # "ttft_before", "ttft_after", "decode_before", "decode_after"
    held_out: HeldOut | None = None
    warnings: list[str] = field(default_factory=list)


def calibrate(model: ModelShape, hw: Hardware, precision: Precision,
              obs: list[Observation]) -> CalibrationReport:
    """Fit, in-sample error before and after, and the held-out check; never raises on bad data."""
    before = hw.efficiency
    fit = fit_efficiency(model, hw, precision, obs)
    usable, _ = usable_observations(obs)
    warnings = list(fit.warnings)
    held = held_out_check(model, hw, precision, usable)
    if held is None:
        warnings.append("no held-out check: it needs at least three batch sizes (fit on some, "
                        "predict the others)")
    rows = []
    for o in usable:
        pb, pa = predict(model, hw, precision, before, o), predict(model, hw, precision, fit.efficiency, o)
        rows.append({
            "batch": o.batch, "input_len": o.input_len, "output_len": o.output_len,
            "ttft_ms": o.ttft_s * 1e3, "ttft_before_ms": pb.ttft_s * 1e3,
            "ttft_after_ms": pa.ttft_s * 1e3,
            "decode_tok_s": o.decode_tokens_per_s, "decode_before_tok_s": o.batch / pb.tpot_s,
            "decode_after_tok_s": o.batch / pa.tpot_s,
        })

    def err(key: str, which: str) -> float:
        unit = "_ms" if key == "ttft" else "_tok_s"
        return mape([r[f"{key}_{which}{unit}"] for r in rows], [r[f"{key}{unit}"] for r in rows])

    errors = {f"{k}_{w}": err(k, w) for k in ("ttft", "decode") for w in ("before", "after")}
    return CalibrationReport(usable, before, fit.efficiency, rows, errors, held, warnings)


def render_calibration(rep: CalibrationReport, model: ModelShape, hw: Hardware) -> str:
    lines = [
        f"# soar plan --calibrate: {model.name} on {hw.name}", "",
        "| batch | in | out | TTFT ms measured | before | after | decode tok/s measured | "
        "before | after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep.rows:
        lines.append(
            f"| {r['batch']} | {r['input_len']} | {r['output_len']} | {r['ttft_ms']:.1f} | "
            f"{r['ttft_before_ms']:.1f} | {r['ttft_after_ms']:.1f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_before_tok_s']:.1f} | {r['decode_after_tok_s']:.1f} |"
        )
    e = rep.mape
    lines += [
        "",
        f"MAPE before calibration: TTFT {e['ttft_before']:.1f}%, decode throughput "
        f"{e['decode_before']:.1f}%.",
        f"MAPE after calibration:  TTFT {e['ttft_after']:.1f}%, decode throughput "
        f"{e['decode_after']:.1f}%.",
    ]
    if rep.held_out:
        h = rep.held_out
        lines.append(
            f"Held-out check (fit on batch sizes {', '.join(map(str, h.fit_batches))}; predict "
            f"{', '.join(map(str, h.held_out_batches))}): MAPE TTFT {h.mape['ttft']:.1f}%, "
            f"decode throughput {h.mape['decode']:.1f}%.")
    lines += [
        "",
        "Fitted efficiency: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in rep.after.to_dict().items()),
        "",
    ]
    if rep.warnings:
        lines += ["Warnings:", *[f"- {w}" for w in rep.warnings], ""]
    return "\n".join(lines)
