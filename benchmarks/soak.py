"""Soak test of `soar serve`: hours-of-traffic behaviour in minutes.

1. Capacity: a closed loop of --capacity-clients clients sends the request mix for
   --capacity-seconds; completed requests per second is the measured capacity.
2. Soak: requests arrive as a Poisson process at --load (default 80%) of that capacity for
   --duration seconds (default 10 minutes). The mix: prompt lengths from a few to a few hundred
   words, max_tokens of 16/64/128, half of the prompts behind one of four shared prefixes (prefix
   caching), and --cancel-frac (20%) of the streams closed by the client after a few chunks.
3. Report, written as JSON to results/: completed / failed / aborted counts, TTFT and TPOT p50/p99
   per --window seconds, the server's RSS over time, and the KV blocks once traffic stopped
   (from /metrics; every block must be free again).

Prompt text comes from the Python standard library's sources (text this project did not write).

    python benchmarks/soak.py                                    # default model, 10 minutes
    python benchmarks/soak.py --duration 60 --capacity-seconds 20  # a quick check
    python benchmarks/soak.py --url http://host:8000 --server-pid 1234  # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import random
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Record:
    start: float  # seconds since the soak began
    kind: str  # "full" | "cancel"
    prompt_words: int
    max_tokens: int
    shared_prefix: bool
    outcome: str = "pending"  # completed | aborted (client closed) | failed
    status: int | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens: int = 0
    error: str | None = None


# -- the request mix -------------------------------------------------------------------------


def corpus_words() -> list[str]:
    import argparse as a
    import collections
    import json as j
    import textwrap

    text = "\n".join(inspect.getsource(m) for m in (a, collections, j, textwrap))
    return re.findall(r"\S+", text)


class Mix:
    def __init__(self, seed: int, cancel_frac: float):
        self.rng = random.Random(seed)
        self.words = corpus_words()
        self.cancel_frac = cancel_frac
        self.prefixes = [self._span(200) for _ in range(4)]

    def _span(self, n: int) -> str:
        i = self.rng.randrange(len(self.words) - n)
        return " ".join(self.words[i : i + n])

    def next(self) -> tuple[dict, Record]:
        n = int(np.exp(self.rng.uniform(np.log(4), np.log(400))))  # log-uniform lengths
        shared = self.rng.random() < 0.5
        prompt = (self.rng.choice(self.prefixes) + "\n" if shared else "") + self._span(n)
        max_tokens = self.rng.choice([16, 64, 128])
        kind = "cancel" if self.rng.random() < self.cancel_frac else "full"
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                "stream": True, "ignore_eos": True}
        return body, Record(0.0, kind, n + (200 if shared else 0), max_tokens, shared)


async def run_one(http: httpx.AsyncClient, model: str, body: dict, rec: Record,
                  rng: random.Random, t0: float) -> Record:
    rec.start = time.monotonic() - t0
    start = time.monotonic()
    stop_after = rng.randint(1, 6) if rec.kind == "cancel" else None
    first = last = None
    try:
        async with http.stream("POST", "/v1/completions", json={**body, "model": model}) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                rec.outcome, rec.error = "failed", (await r.aread()).decode()[:200]
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    rec.outcome, rec.error = "failed", event["error"]["message"][:200]
                    return rec
                if event["choices"] and event["choices"][0]["text"]:
                    now = time.monotonic()
                    first = first or now
                    last = now
                    rec.tokens += 1
                    if stop_after is not None and rec.tokens >= stop_after:
                        rec.outcome = "aborted"
                        break
    except httpx.HTTPError as e:
        rec.outcome, rec.error = "failed", f"{type(e).__name__}: {e}"[:200]
        return rec
    if first is not None:
        rec.ttft_s = first - start
        if rec.tokens > 1 and last is not None:
            rec.tpot_s = (last - first) / (rec.tokens - 1)
    if rec.outcome == "pending":
        rec.outcome = "completed"
    return rec


# -- capacity and soak -------------------------------------------------------------------------


async def measure_capacity(base: str, model: str, mix: Mix, clients: int, seconds: float,
                           seed: int) -> float:
    """Completed requests per second, closed loop, no cancellations."""
    done = 0
    t0 = time.monotonic()
    rng = random.Random(seed)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() - t0 < seconds:
            body, rec = mix.next()
            rec.kind = "full"
            rec = await run_one(http, model, body, rec, rng, t0)
            if rec.outcome == "completed":
                done += 1

    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return done / (time.monotonic() - t0)


def rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def soak(base: str, model: str, mix: Mix, rate: float, duration: float, seed: int,
               pid: int | None, sample_s: float) -> tuple[list[Record], list[dict]]:
    rng = random.Random(seed + 1)
    records: list[Record] = []
    rss: list[dict] = []
    tasks: list[asyncio.Task] = []
    t0 = time.monotonic()

    async def sample_rss() -> None:
        while True:
            rss.append({"t_s": round(time.monotonic() - t0, 1), "rss_kib": rss_kib(pid),
                        "in_flight": sum(not t.done() for t in tasks)})
            await asyncio.sleep(sample_s)

    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        sampler = asyncio.create_task(sample_rss())
        next_at = 0.0
        while True:
            next_at += rng.expovariate(rate)
            if next_at >= duration:
                break
            await asyncio.sleep(max(0.0, next_at - (time.monotonic() - t0)))
            body, rec = mix.next()
            records.append(rec)
            tasks.append(asyncio.create_task(run_one(http, model, body, rec, rng, t0)))
        await asyncio.gather(*tasks)
        sampler.cancel()
    rss.append({"t_s": round(time.monotonic() - t0, 1), "rss_kib": rss_kib(pid), "in_flight": 0})
    return records, rss


# -- reporting ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def windows(records: list[Record], window_s: float, duration: float) -> list[dict]:
    out = []
    for w0 in np.arange(0.0, duration, window_s):
        rs = [r for r in records if w0 <= r.start < w0 + window_s]
        ttft = [r.ttft_s for r in rs if r.ttft_s is not None]
        tpot = [r.tpot_s for r in rs if r.tpot_s is not None and r.outcome == "completed"]
        out.append({
            "window_start_s": float(w0), "requests": len(rs),
            "completed": sum(r.outcome == "completed" for r in rs),
            "aborted": sum(r.outcome == "aborted" for r in rs),
            "failed": sum(r.outcome == "failed" for r in rs),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
        })
    return out


def scrape(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(soar:[a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def kv_after_idle(base: str, timeout_s: float = 120) -> dict[str, float]:
    """The KV gauges once the engine has nothing running or waiting."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(base)
        idle = m.get("soar:num_requests_running", 1) == 0 and \
            m.get("soar:num_requests_waiting", 1) == 0
        if idle or time.monotonic() > deadline:
            return {"idle": idle, "num_kv_blocks_free": m.get("soar:num_kv_blocks_free"),
                    "num_kv_blocks_total": m.get("soar:num_kv_blocks_total"),
                    "prefix_cache_hit_rate": m.get("soar:prefix_cache_hit_rate"),
                    "num_preemptions": m.get("soar:num_preemptions_total")}
        time.sleep(0.5)


# -- server ------------------------------------------------------------------------------------


def launch(model: str, extra: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "soarllm.cli.main", "serve", model, "--port", str(port),
           "--no-access-log", "--served-model-name", "soak", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soar serve exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("soar serve did not become healthy in time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--url", default=None, help="soak a running server instead of starting one")
    ap.add_argument("--served-name", default="soak", help="model name to send (with --url)")
    ap.add_argument("--server-pid", type=int, default=None, help="its pid, for RSS (with --url)")
    ap.add_argument("--serve-args", default="--max-model-len 2048",
                    help="extra `soar serve` flags for the server this script starts")
    ap.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    ap.add_argument("--load", type=float, default=0.8, help="arrival rate / capacity")
    ap.add_argument("--cancel-frac", type=float, default=0.2)
    ap.add_argument("--capacity-clients", type=int, default=8)
    ap.add_argument("--capacity-seconds", type=float, default=60.0)
    ap.add_argument("--window", type=float, default=60.0, help="seconds per report window")
    ap.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "results" / "soak" / f"soak-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = None
    if args.url:
        base, model, pid = args.url.rstrip("/"), args.served_name, args.server_pid
    else:
        proc, base = launch(args.model, args.serve_args.split(), out.with_suffix(".server.log"))
        model, pid = "soak", proc.pid
    try:
        mix = Mix(args.seed, args.cancel_frac)
        print(f"measuring capacity: {args.capacity_clients} clients, {args.capacity_seconds:.0f} s",
              file=sys.stderr)
        capacity = asyncio.run(measure_capacity(base, model, mix, args.capacity_clients,
                                                args.capacity_seconds, args.seed))
        if capacity <= 0:
            raise SystemExit("no request completed while measuring capacity")
        rate = args.load * capacity
        print(f"capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s for "
              f"{args.duration:.0f} s", file=sys.stderr)
        kv_before = kv_after_idle(base)
        t_start = time.time()
        records, rss = asyncio.run(soak(base, model, Mix(args.seed + 7, args.cancel_frac), rate,
                                        args.duration, args.seed, pid, args.rss_every))
        wall = time.time() - t_start
        kv_end = kv_after_idle(base)
        health = httpx.get(base + "/health", timeout=10).status_code
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    count = {k: sum(r.outcome == k for r in records) for k in ("completed", "aborted", "failed")}
    rss_values = [s["rss_kib"] for s in rss if s["rss_kib"] is not None]
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "capacity_req_s": round(capacity, 3), "arrival_rate_req_s": round(rate, 3),
        "wall_s": round(wall, 1), "requests": len(records), **count,
        "failed_examples": [r.error for r in records if r.outcome == "failed"][:5],
        "windows": windows(records, args.window, args.duration),
        "overall": windows(records, args.duration + 1, args.duration + 1)[0],
        "kv_before": kv_before, "kv_end": kv_end,
        "kv_all_free_at_end": kv_end["num_kv_blocks_free"] == kv_end["num_kv_blocks_total"],
        "health_at_end": health,
        "rss_kib": rss, "rss_growth_kib": (rss_values[-1] - rss_values[0]) if rss_values else None,
        "records": [asdict(r) for r in records],
    }
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items()
                      if k not in ("records", "rss_kib", "windows", "config")}, indent=1))
    for w in report["windows"]:
        print(w)
    print(f"wrote {out}", file=sys.stderr)
    ok = count["failed"] == 0 and report["kv_all_free_at_end"] and health == 200
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
