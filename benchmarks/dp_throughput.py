"""Data parallelism on CPU: `soar serve -dp 1` vs `-dp 2`, output tokens/s at concurrency 32 with
prompts that share a few long prefixes, and the router's prefix hit rate.

Both servers run the same random Llama (hidden 576, 12 layers, float32) with their models on mp
worker processes (the cores split between the replicas' workers). Requests: --requests
completions of --max-tokens tokens each, greedy, ignore_eos; each prompt is one of 4 "system"
prefixes (~200 tokens) plus a short distinct question, sent 32 at a time over HTTP. On a 2-core
machine two replicas split the same two cores; figures are noisy (others share the machine):
compare the rows of one run.

    python benchmarks/dp_throughput.py --out benchmarks/results/dp_throughput
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prompts(n: int) -> list[str]:
    import inspect
    import json as jsonmod

    source = inspect.getsource(jsonmod.decoder)
    systems = [source[i * 900 : i * 900 + 400] for i in range(4)]
    return [systems[i % 4] + f"\n# question {i}: what does line {i} do?\n" for i in range(n)]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def load(base: str, texts: list[str], max_tokens: int, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(http: httpx.AsyncClient, p: str) -> None:
        nonlocal tokens
        async with sem:
            r = await http.post("/v1/completions", json={
                "model": "m", "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True})
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(http, p) for p in texts))
        elapsed = time.perf_counter() - t0
    return {"output_tokens": tokens, "seconds": round(elapsed, 2),
            "output_tok_s": round(tokens / elapsed, 1)}


def main() -> None:
    from tests.serve.conftest import start_soar_serve
    from tests.tiny import make_tiny_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    os.environ.setdefault("SOARLLM_ENFORCE_EAGER", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    model_dir = Path(tempfile.gettempdir()) / "soar-tp-bench-12"  # shared with tp_overhead.py
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, "llama", hidden_size=576, num_attention_heads=8,
                        num_key_value_heads=4, intermediate_size=1536, num_hidden_layers=12)
    texts = prompts(a.requests)
    rows = []
    for dp in (1, 2):
        log = Path(tempfile.gettempdir()) / f"soar-dp{dp}.log"
        srv = start_soar_serve(str(model_dir), "-dp", str(dp), "--served-model-name", "m",
                               "--distributed-executor-backend", "mp", "--kv-cache-memory",
                               "512MiB", "--no-access-log", log_path=log)
        try:
            asyncio.run(load(srv.base_url, texts[:2], 2, 2))  # warm-up
            row = {"dp": dp, **asyncio.run(load(srv.base_url, texts, a.max_tokens,
                                                a.concurrency))}
            m = httpx.get(srv.base_url + "/metrics").text
            if dp > 1:
                routed = metric(m, "soar:router_requests_total")
                row["router_prefix_hit_rate"] = round(
                    metric(m, "soar:router_prefix_routed_total") / routed, 3) if routed else 0.0
            queries = metric(m, "soar:prefix_cache_queries_total")
            row["prefix_cache_hit_rate"] = round(
                metric(m, "soar:prefix_cache_hits_total") / queries, 3) if queries else 0.0
        finally:
            srv.stop()
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": "random llama h576 8q/4kv heads mlp1536 x12 layers, float32",
              "cpu_count": os.cpu_count(), "requests": a.requests, "max_tokens": a.max_tokens,
              "concurrency": a.concurrency, "rows": rows,
              "note": "shared 2-core machine: noisy; the replicas split the same cores"}
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "dp_throughput.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
