"""Benchmark results as JSON (every raw timing) and as a Markdown report, endpoints side by side.

The JSON document is the interface: the Markdown report, the plots and ``soar plan --calibrate``
all read it, so a saved result can be re-rendered or re-used later.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from soarllm.bench import metrics as metrics_module
from soarllm.bench.client import Endpoint
from soarllm.bench.launch import EaseMetrics
from soarllm.bench.runner import RunResult
from soarllm.bench.sweep import Capacity

SCHEMA = "soarllm.bench.serve/1"


@dataclass
class EndpointResult:
    endpoint: Endpoint
    model: str
    runs: list[RunResult]
    ease: EaseMetrics | None = None
    capacity: Capacity | None = None


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def _run_dict(run: RunResult, keep_text: bool) -> dict[str, Any]:
    requests = []
    for r in run.requests:
        d = asdict(r)
        if not keep_text:
            d.pop("generated_text")
        requests.append(d)
    return {
        "load": {
            "label": run.load.label(),
            "request_rate": _finite(run.load.request_rate),
            "max_concurrency": run.load.max_concurrency,
            "burstiness": _finite(run.load.burstiness),
        },
        "metrics": run.metrics.to_dict(),
        "token_check": asdict(run.token_check),
        "requests": requests,
    }


def build_document(
    results: list[EndpointResult], config: dict[str, Any], keep_text: bool = False
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": config,
        "metric_definitions": metrics_module.__doc__,
        "endpoints": [
            {
                "label": res.endpoint.label,
                "url": res.endpoint.url,
                "api": res.endpoint.api,
                "model": res.model,
                "ease": asdict(res.ease) if res.ease else None,
                "capacity": asdict(res.capacity) if res.capacity else None,
                "runs": [_run_dict(run, keep_text) for run in res.runs],
            }
            for res in results
        ],
    }


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1, default=str))


def _ms(d: dict[str, Any], key: str) -> str:
    value = d["median"] if key == "median" else d["mean"] if key == "mean" else d["percentiles"].get(key)
    return "-" if value is None else f"{value:.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def render_markdown(doc: dict[str, Any]) -> str:
    cfg = doc.get("config", {})
    lines = ["# soar bench serve", ""]
    workload = cfg.get("workload", {})
    if workload:
        lines.append(
            "Workload: `{name}`, {num_prompts} requests, input {input_len} / output {output_len} "
            "tokens, API `{api}`.".format(**{k: workload.get(k) for k in
                                            ("name", "num_prompts", "input_len", "output_len", "api")})
        )
    if cfg.get("slo"):
        lines.append(f"SLO: {cfg['slo']}.")
    lines += ["", "## Latency and throughput (ms; tok/s)", ""]
    head = ["endpoint", "load", "ok/sent", "req/s", "out tok/s"]
    for metric in ("TTFT", "TPOT", "ITL", "E2EL"):
        head += [f"{metric} mean", f"{metric} med", f"{metric} p90", f"{metric} p99"]
    head += ["goodput req/s", "SLO att."]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ep in doc["endpoints"]:
        for run in ep["runs"]:
            m = run["metrics"]
            row = [ep["label"], run["load"]["label"], f"{m['completed']}/{m['num_requests']}",
                   f"{m['request_throughput']:.2f}", f"{m['output_throughput']:.1f}"]
            for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
                row += [_ms(m[key], k) for k in ("mean", "median", "p90", "p99")]
            row.append("-" if m["request_goodput"] is None else f"{m['request_goodput']:.2f}")
            row.append("-" if m["slo_attainment"] is None else f"{m['slo_attainment']:.0%}")
            lines.append("| " + " | ".join(row) + " |")

    if len(doc["endpoints"]) > 1:
        base = doc["endpoints"][0]
        by_load = {run["load"]["label"]: run["metrics"] for run in base["runs"]}
        lines += ["", f"## Side by side (ratio to `{base['label']}`; median latencies)", "",
                  "| endpoint | load | TTFT ratio | TPOT ratio | out tok/s ratio |",
                  "|---|---|---|---|---|"]
        for ep in doc["endpoints"][1:]:
            for run in ep["runs"]:
                ref = by_load.get(run["load"]["label"])
                if ref is None:
                    continue
                m = run["metrics"]
                lines.append(
                    f"| {ep['label']} | {run['load']['label']} | "
                    f"{_ratio(m['ttft_ms']['median'], ref['ttft_ms']['median'])} | "
                    f"{_ratio(m['tpot_ms']['median'], ref['tpot_ms']['median'])} | "
                    f"{_ratio(m['output_throughput'], ref['output_throughput'])} |"
                )

    capacities = [(ep["label"], ep["capacity"]) for ep in doc["endpoints"] if ep.get("capacity")]
    if capacities:
        lines += ["", "## Capacity (highest load with >= 90% of requests meeting the SLO)", "",
                  "| endpoint | swept | capacity | attainment there | first failing |",
                  "|---|---|---|---|---|"]
        for label, cap in capacities:
            value = "none passed" if cap["value"] is None else (
                f">= {cap['value']:g}" if cap["lower_bound"] else f"{cap['value']:g}")
            att = "-" if cap["attainment"] is None else f"{cap['attainment']:.0%}"
            fail = "-" if cap["first_failing"] is None else f"{cap['first_failing']:g}"
            lines.append(f"| {label} | {cap['variable']} | {value} | {att} | {fail} |")

    eases = [(ep["label"], ep["ease"]) for ep in doc["endpoints"] if ep.get("ease")]
    if eases:
        lines += ["", "## Ease (servers launched by the benchmark)", "",
                  "| endpoint | command | start -> ready (s) | start -> first token (s) | "
                  "peak RSS at first token (MiB) | peak RSS overall (MiB) |",
                  "|---|---|---|---|---|---|"]
        for label, e in eases:
            def f(x: float | None, fmt: str = ".2f") -> str:
                return "-" if x is None else format(x, fmt)

            lines.append(
                f"| {label} | `{e['command']}` | {f(e['time_to_ready_s'])} | "
                f"{f(e['time_to_first_token_s'])} | {f(e['startup_peak_rss_mb'], '.0f')} | "
                f"{f(e['peak_rss_mb'], '.0f')} |"
            )

    lines += ["", "## Token counts: server usage vs our tokenizer", "",
              "| endpoint | load | with usage | compared | mismatched | mean abs diff |",
              "|---|---|---|---|---|---|"]
    for ep in doc["endpoints"]:
        for run in ep["runs"]:
            t = run["token_check"]
            lines.append(
                f"| {ep['label']} | {run['load']['label']} | {t['requests_with_usage']} | "
                f"{t['requests_compared']} | {t['mismatched']} | {t['mean_abs_diff']:.2f} |"
            )
    lines += ["", "## Definitions", "", doc.get("metric_definitions", "").strip(), ""]
    return "\n".join(lines)
