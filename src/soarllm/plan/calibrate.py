"""Fit the roofline's efficiency factors to soar bench results, and report prediction error.

Observations are (batch, input length, output length, measured TTFT, measured TPOT): from
``soar bench offline`` (a batch of prompts submitted together) or from ``soar bench serve`` runs at
a fixed concurrency with every request sent at once (batch = concurrency). The medians are used.

The fit minimises the mean squared log ratio of predicted to measured TTFT and TPOT over
compute_eff, memory_eff, step_overhead_s and seq_overhead_s (Nelder-Mead in log space, from a
few starting points), once with compute and memory overlapped (max) and once serialised (sum),
and keeps the better. Error is reported as MAPE (mean absolute percentage error).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from soarllm.errors import InvalidRequestError
from soarllm.plan.hardware import Efficiency, Hardware
from soarllm.plan.model_shape import ModelShape
from soarllm.plan.roofline import Precision, Roofline


@dataclass(frozen=True)
class Observation:
    batch: int
    input_len: int
    output_len: int
    ttft_s: float
    tpot_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / self.tpot_s


def observations_from_results(doc: dict[str, Any]) -> list[Observation]:
    """Observations from a soar bench JSON document (serve or offline)."""
    obs: list[Observation] = []
    schema = str(doc.get("schema", ""))
    if schema.startswith("soarllm.bench.offline"):
        for run in doc.get("latency_runs", []):
            obs.append(Observation(
                batch=int(run["batch_size"]),
                input_len=round(run["mean_input_len"]),
                output_len=round(run["mean_output_len"]),
                ttft_s=run["ttft_ms"]["median"] / 1e3,
                tpot_s=run["tpot_ms"]["median"] / 1e3,
            ))
    elif schema.startswith("soarllm.bench.serve"):
        for ep in doc.get("endpoints", [])[:1]:
            for run in ep["runs"]:
                load, m = run["load"], run["metrics"]
                if load["request_rate"] != "inf" or m["completed"] == 0:
                    continue  # only all-at-once runs have a well-defined batch
                batch = load["max_concurrency"] or m["num_requests"]
                obs.append(Observation(
                    batch=int(batch),
                    input_len=round(m["mean_input_len"]),
                    output_len=round(m["mean_output_len"]),
                    ttft_s=m["ttft_ms"]["median"] / 1e3,
                    tpot_s=m["tpot_ms"]["median"] / 1e3,
                ))
    else:
        raise InvalidRequestError(f"not a soar bench result (schema {schema!r})")
    obs = [o for o in obs if o.ttft_s > 0 and o.tpot_s > 0]
    if not obs:
        raise InvalidRequestError(
            "the results hold no usable run: calibrate from `soar bench offline` or from "
            "`soar bench serve --concurrency ...` runs without --request-rate"
        )
    return sorted(obs, key=lambda o: o.batch)


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
    return 100.0 * float(np.mean([abs(p - m) / m for p, m in zip(predicted, measured)]))


def nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, step: float = 0.5,
                iters: int = 600, tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """Minimise f from x0 with the Nelder-Mead simplex (standard coefficients)."""
    n = len(x0)
    simplex = [x0.astype(float)] + [x0 + step * np.eye(n)[i] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iters):
        order = np.argsort(values)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        if abs(values[-1] - values[0]) < tol:
            break
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2 * (centroid - simplex[-1])
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best] + [best + 0.5 * (x - best) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    i = int(np.argmin(values))
    return simplex[i], values[i]


_FLOOR = 1e-7  # overheads below 0.1 µs count as zero


def _to_eff(x: np.ndarray, base: Efficiency, overlap: bool) -> Efficiency:
    return replace(
        base,
        compute_eff=float(math.exp(x[0])),
        memory_eff=float(math.exp(x[1])),
        step_overhead_s=float(max(math.exp(x[2]) - _FLOOR, 0.0)),
        seq_overhead_s=float(max(math.exp(x[3]) - _FLOOR, 0.0)),
        overlap=overlap,
    )


def fit_efficiency(model: ModelShape, hw: Hardware, precision: Precision,
                   obs: list[Observation]) -> tuple[Efficiency, float]:
    """The efficiency factors that best explain the observations, and the fit's loss."""
    def loss(eff: Efficiency) -> float:
        total = 0.0
        for o in obs:
            p = predict(model, hw, precision, eff, o)
            total += math.log(p.ttft_s / o.ttft_s) ** 2 + math.log(p.tpot_s / o.tpot_s) ** 2
        return total / len(obs)

    best: tuple[Efficiency, float] | None = None
    for overlap in (True, False):
        for ce, me, ovh in ((0.5, 0.5, 1e-3), (0.1, 0.1, 1e-2), (1.0, 1.0, 1e-4)):
            x0 = np.log([ce, me, ovh + _FLOOR, 1e-4 + _FLOOR])
            x, value = nelder_mead(lambda x, o=overlap: loss(_to_eff(x, hw.efficiency, o)), x0)
            if best is None or value < best[1]:
                best = (_to_eff(x, hw.efficiency, overlap), value)
    assert best is not None
    return best


@dataclass
class CalibrationReport:
    observations: list[Observation]
    before: Efficiency
    after: Efficiency
    rows: list[dict[str, float]]
    mape: dict[str, float]  # "ttft_before", "ttft_after", "decode_before", "decode_after", ...


def calibrate(model: ModelShape, hw: Hardware, precision: Precision,
              obs: list[Observation]) -> CalibrationReport:
    before = hw.efficiency
    after, _ = fit_efficiency(model, hw, precision, obs)
    rows = []
    for o in obs:
        pb, pa = predict(model, hw, precision, before, o), predict(model, hw, precision, after, o)
        rows.append({
            "batch": o.batch, "input_len": o.input_len, "output_len": o.output_len,
            "ttft_ms": o.ttft_s * 1e3, "ttft_before_ms": pb.ttft_s * 1e3,
            "ttft_after_ms": pa.ttft_s * 1e3,
            "decode_tok_s": o.decode_tokens_per_s, "decode_before_tok_s": o.batch / pb.tpot_s,
            "decode_after_tok_s": o.batch / pa.tpot_s,
        })

    def err(key: str, which: str) -> float:
        return mape([r[f"{key}_{which}{'_ms' if key == 'ttft' else '_tok_s'}"] for r in rows],
                    [r[f"{key}_ms" if key == "ttft" else f"{key}_tok_s"] for r in rows])

    errors = {f"{k}_{w}": err(k, w) for k in ("ttft", "decode") for w in ("before", "after")}
    return CalibrationReport(obs, before, after, rows, errors)


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
        "",
        "Fitted efficiency: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in rep.after.to_dict().items()),
        "",
    ]
    return "\n".join(lines)
