"""``soar bench serve``: the same workload and load sweep against each endpoint in turn."""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from soarllm.bench.arrivals import LoadPoint
from soarllm.bench.client import Endpoint
from soarllm.bench.launch import EaseMetrics, LaunchedServer
from soarllm.bench.metrics import DEFAULT_PERCENTILES, SLO
from soarllm.bench.report import EndpointResult, build_document, render_markdown, write_json
from soarllm.bench.runner import RunResult, run_load_point
from soarllm.bench.sweep import find_capacity, refine_capacity
from soarllm.bench.workloads import SampleRequest, WorkloadConfig, build_workload


@dataclass
class ServeBenchConfig:
    endpoints: list[Endpoint]
    workload: WorkloadConfig
    loads: list[LoadPoint]
    launches: list[str | None] = field(default_factory=list)  # i-th command serves endpoint i
    slo: SLO | None = None
    warmup: int = 1
    seed: int = 0
    capacity_search_steps: int = 0
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    output_dir: Path | None = None
    progress: bool = True
    keep_text: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "workload": asdict(self.workload),
            "loads": [load.label() for load in self.loads],
            "slo": self.slo.describe() if self.slo else None,
            "warmup": self.warmup,
            "seed": self.seed,
            "percentiles": list(self.percentiles),
            "launches": list(self.launches),
        }


async def _sweep_endpoint(
    cfg: ServeBenchConfig, endpoint: Endpoint, requests: list[SampleRequest], tokenizer: Any
) -> tuple[list[RunResult], Any]:
    async def run(load: LoadPoint, warmup: int) -> RunResult:
        return await run_load_point(
            endpoint, requests, load, slo=cfg.slo, tokenizer=tokenizer, seed=cfg.seed,
            warmup=warmup, progress=cfg.progress, percentiles=cfg.percentiles,
        )

    runs = []
    for i, load in enumerate(cfg.loads):
        runs.append(await run(load, cfg.warmup if i == 0 else 0))
    capacity = find_capacity(runs) if cfg.slo else None
    if capacity is not None and cfg.capacity_search_steps > 0:
        template = cfg.loads[0]

        async def at_rate(rate: float) -> RunResult:
            return await run(LoadPoint(rate, template.max_concurrency, template.burstiness), 0)

        capacity = await refine_capacity(capacity, at_rate, cfg.capacity_search_steps, runs)
    return runs, capacity


def _model_of(endpoint: Endpoint) -> str:
    import httpx

    if endpoint.model:
        return endpoint.model
    response = httpx.get(f"{endpoint.url}/v1/models", headers=endpoint.headers, timeout=30)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def run_serve_benchmark(cfg: ServeBenchConfig, tokenizer: Any) -> dict[str, Any]:
    """Run the sweep against every endpoint (one at a time) and return the JSON document.

    Writes ``results.json``, ``report.md`` and the plots into ``cfg.output_dir`` when it is set.
    """
    requests = build_workload(cfg.workload, tokenizer)
    if cfg.output_dir is not None:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
    results: list[EndpointResult] = []
    for i, endpoint in enumerate(cfg.endpoints):
        command = cfg.launches[i] if i < len(cfg.launches) else None
        ease: EaseMetrics | None = None
        if command:
            log = cfg.output_dir / f"server-{i}.log" if cfg.output_dir else None
            with LaunchedServer(command, endpoint, log_path=log) as server:
                model = _model_of(endpoint)
                runs, capacity = asyncio.run(_sweep_endpoint(cfg, endpoint, requests, tokenizer))
            ease = server.ease
        else:
            model = _model_of(endpoint)
            runs, capacity = asyncio.run(_sweep_endpoint(cfg, endpoint, requests, tokenizer))
        results.append(EndpointResult(endpoint, model, runs, ease, capacity))

    doc = build_document(results, cfg.describe(), keep_text=cfg.keep_text)
    if cfg.output_dir is not None:
        write_outputs(doc, cfg.output_dir)
    return doc


def write_outputs(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    from soarllm.bench.plots import write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(doc, out_dir / "results.json")
    (out_dir / "report.md").write_text(render_markdown(doc))
    return [out_dir / "results.json", out_dir / "report.md", *write_plots(doc, out_dir)]


def parse_rates(values: list[str] | None) -> list[float]:
    if not values:
        return [math.inf]
    rates = []
    for v in ",".join(values).split(","):
        v = v.strip().lower()
        if v:
            rates.append(math.inf if v in ("inf", "infinity") else float(v))
    return rates
