"""Per-key rate limits under a 2x over-limit load: the share of 429s against the expected share.

One `soar serve` with two keys and `--rate-limit-rpm R --rate-limit-tpm T`, driven open-loop (each
request sent at its scheduled time, whatever the previous ones are doing) for one 60-second
window:

- key ``requests``: 2R requests a minute of a 1-token prompt and 1 generated token, so only the
  request limit binds (both limits apply to every key; the R admitted requests hold 2R tokens,
  far under T);
- key ``tokens``: R requests a minute (at the request limit, not over it) that each reserve and use
  exactly ``c`` tokens (prompt + max_tokens with ignore_eos), with T = R x c / 2: twice the token
  limit.

Over one window the limiter must admit exactly R (resp. T / c) of them, so the expected share of
429s is 1 - admitted / offered = 50% for each; the run reports the measured share, its relative
error (target: within 10%) and the Retry-After values the refusals carried.

    python benchmarks/rate_limit.py                   # default model, R = 60, one minute
    python benchmarks/rate_limit.py --rpm 120 --model /path/to/hf_dir
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

WINDOW_S = 60.0
KEYS = {"requests": "bench-requests-key", "tokens": "bench-tokens-key"}


@dataclass
class Phase:
    key: str
    limit: str
    offered: int = 0
    admitted: int = 0
    rate_limited: int = 0
    other_errors: list[str] = field(default_factory=list)
    retry_after: list[int] = field(default_factory=list)
    expected_share_429: float = 0.0
    share_429: float = 0.0
    relative_error: float = 0.0
    within_10_percent: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, keys_file: Path, tpm: int, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "soarllm.cli.main", "serve", args.model, "--port", str(port),
           "--no-access-log", "--log-level", "warning", "--api-keys-file", str(keys_file),
           "--rate-limit-rpm", str(args.rpm), "--rate-limit-tpm", str(tpm),
           "--max-num-seqs", "64"]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soar serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("soar serve did not become healthy in time")


async def drive(http: httpx.AsyncClient, phase: Phase, start: float, per_minute: int,
                body: dict) -> None:
    """Send ``per_minute`` requests a minute for one window, each at its scheduled time."""
    headers = {"Authorization": f"Bearer {KEYS[phase.key]}"}
    interval = WINDOW_S / per_minute

    async def one() -> None:
        r = await http.post("/v1/completions", json=body, headers=headers)
        if r.status_code == 200:
            phase.admitted += 1
        elif r.status_code == 429:
            phase.rate_limited += 1
            phase.retry_after.append(int(r.headers["retry-after"]))
        else:
            phase.other_errors.append(f"{r.status_code}: {r.text[:200]}")

    tasks = []
    for i in range(per_minute):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        phase.offered += 1
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)


def score(phase: Phase, expected_admitted: int) -> None:
    phase.expected_share_429 = 1 - expected_admitted / phase.offered
    phase.share_429 = phase.rate_limited / phase.offered
    phase.relative_error = abs(phase.share_429 - phase.expected_share_429) \
        / phase.expected_share_429
    phase.within_10_percent = phase.relative_error <= 0.10 and not phase.other_errors


async def run(args: argparse.Namespace, url: str, tpm: int, cost: int, max_tokens: int):
    phases = [Phase("requests", "requests per minute"), Phase("tokens", "tokens per minute")]
    prompt = [100 + i for i in range(args.prompt_tokens)]
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        start = time.monotonic() + 0.5
        await asyncio.gather(
            drive(http, phases[0], start, 2 * args.rpm,
                  {"model": args.served_name, "prompt": prompt[:1], "max_tokens": 1}),
            drive(http, phases[1], start, args.rpm,
                  {"model": args.served_name, "prompt": prompt, "max_tokens": max_tokens,
                   "ignore_eos": True}),
        )
    score(phases[0], args.rpm)
    score(phases[1], tpm // cost)
    return phases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rpm", type=int, default=60, help="--rate-limit-rpm of the server")
    p.add_argument("--max-tokens", type=int, default=8,
                   help="tokens generated by each request of the token phase")
    p.add_argument("--prompt-tokens", type=int, default=8,
                   help="length of every prompt (token ids, so its cost is exact)")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "rate_limit"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="rate-limit-"))
    keys_file = tmp / "keys.txt"
    keys_file.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
    # prompts are token ids, so each request's cost is known without a tokenizer
    cost = args.prompt_tokens + args.max_tokens
    tpm = args.rpm * cost // 2  # the token key offers rpm x cost a minute: twice this
    if 2 * args.rpm > tpm:
        raise SystemExit("the request phase would hit the token limit: raise --max-tokens")
    proc, url = launch(args, keys_file, tpm, tmp / "server.log")
    try:
        auth = {"Authorization": f"Bearer {KEYS['tokens']}"}
        args.served_name = httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"]
        began = time.time()
        phases = asyncio.run(run(args, url, tpm, cost, args.max_tokens))
        seconds = time.time() - began
        usage = httpx.get(url + "/v1/usage", headers=auth).json()
    finally:
        proc.terminate()
        proc.wait(60)
    result = {
        "benchmark": "rate_limit", "model": args.model, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "window_s": WINDOW_S, "seconds": round(seconds, 1),
        "rate_limit_rpm": args.rpm, "rate_limit_tpm": tpm, "tokens_per_request": cost,
        "phases": [asdict(ph) | {"retry_after": {
            "min": min(ph.retry_after, default=None), "max": max(ph.retry_after, default=None),
            "count": len(ph.retry_after)}} for ph in phases],
        "usage_report_tokens_key": usage["data"],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    for ph in phases:
        print(f"{ph.limit:>20}: offered {ph.offered}, admitted {ph.admitted}, 429 {ph.rate_limited}"
              f" -> share {ph.share_429:.3f} vs expected {ph.expected_share_429:.3f} "
              f"(relative error {ph.relative_error:.1%}, within 10%: {ph.within_10_percent})"
              + (f"; other errors: {ph.other_errors[:3]}" if ph.other_errors else ""))
    print(f"wrote {out / 'result.json'}")
    return 0 if all(ph.within_10_percent for ph in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
