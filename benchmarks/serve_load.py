"""Serving overhead, side by side in one run: `soar serve` over HTTP vs LLM.generate offline.

The server is driven with streaming chat requests by a closed loop of C clients (concurrency 1, 8
and 32 by default): each client sends its next request as soon as the previous one ended. Every
request asks for the same number of output tokens (ignore_eos) so both sides do the same work.
Offline, the same prompts go through LLM.generate in waves of C requests. For each concurrency the
run prints TTFT and TPOT (p50, p99) and output tokens/s, and the serving/offline throughput ratio
(target at concurrency 32: >= 0.90). Trials alternate between the two sides and each keeps its
best, so a busy spell on a shared machine does not decide the ratio.

    python benchmarks/serve_load.py                              # default model, writes JSON
    python benchmarks/serve_load.py --output-len 32 --requests-per-client 2
    python benchmarks/serve_load.py --model /path/to/hf_dir --concurrency 1,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

QUESTIONS = [
    "Explain what a hash table is.", "Write a haiku about the sea.",
    "What causes the seasons on Earth?", "Give three tips for writing clean Python code.",
    "Summarize the plot of Romeo and Juliet.", "How does a bicycle stay upright?",
    "What is the difference between a list and a tuple?", "Describe a sunset in one paragraph.",
    "Why is the sky blue?", "List five fruits that are rich in vitamin C.",
    "What is recursion? Give an example.", "How do vaccines work?",
    "Name the planets of the solar system.", "What is a prime number?",
    "Describe how to make a cup of tea.", "What does HTTP stand for and what is it used for?",
]


@dataclass
class LevelResult:
    side: str  # "serve" | "offline"
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    output_tok_s: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    tpot_ms_p50: float
    tpot_ms_p99: float


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(side: str, c: int, ttfts: list[float], tpots: list[float], tokens: int,
              seconds: float, requests: int) -> LevelResult:
    return LevelResult(
        side=side, concurrency=c, requests=requests, output_tokens=tokens, seconds=seconds,
        output_tok_s=tokens / seconds,
        ttft_ms_p50=1000 * percentile(ttfts, 50), ttft_ms_p99=1000 * percentile(ttfts, 99),
        tpot_ms_p50=1000 * percentile(tpots, 50), tpot_ms_p99=1000 * percentile(tpots, 99),
    )


def messages_for(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


# -- the server side ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "soarllm.cli.main", "serve", args.model, "--port", str(port),
           "--max-num-seqs", str(max(args.concurrency)), "--no-access-log",
           "--log-level", "warning", *engine_flags(args)]
    if args.engine_threads is not None:
        cmd += ["--engine-threads", str(args.engine_threads)]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soar serve exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("soar serve did not become healthy in time")


async def one_chat(http: httpx.AsyncClient, model: str, i: int, out_len: int
                   ) -> tuple[float, float | None, int]:
    body = {"model": model, "messages": messages_for(i), "max_completion_tokens": out_len,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
    ttft = (first - start) if first else float("nan")
    tpot = (last - first) / (tokens - 1) if first and last and tokens > 1 else None
    return ttft, tpot, tokens


async def drive(url: str, model: str, c: int, n: int, out_len: int) -> LevelResult:
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        await one_chat(http, model, 0, 4)  # warm-up
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        results: list[tuple[float, float | None, int]] = []

        async def client() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                results.append(await one_chat(http, model, i, out_len))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(c)))
        seconds = time.perf_counter() - start
    return summarize("serve", c, [r[0] for r in results],
                     [r[1] for r in results if r[1] is not None],
                     sum(r[2] for r in results), seconds, n)


# -- the offline side --------------------------------------------------------------------------


class Offline:
    """LLM.generate over the same prompts, in waves of C requests (a closed loop of C clients).

    The engine runs on a worker thread, as the server's engine thread does, so both sides do their
    torch work in the same conditions (on a small shared CPU, torch's intra-op thread pool of the
    main thread can be several times slower than a worker thread's).
    """

    def __init__(self, args: argparse.Namespace, max_concurrency: int, num_prompts: int):
        import torch

        from soarllm import LLM, SamplingParams
        from soarllm.chat_utils import render_chat

        if args.engine_threads is not None:  # the server's setting, for the same compute
            torch.set_num_threads(args.engine_threads)

        self.llm = LLM(args.model, max_num_seqs=max_concurrency, **engine_kwargs(args))
        tok = self.llm.get_tokenizer()
        self.prompts = [tok.encode(render_chat(tok, messages_for(i)), add_special_tokens=False)
                        for i in range(num_prompts)]
        self.params = SamplingParams(temperature=0.0, max_tokens=args.output_len,
                                     ignore_eos=True)
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="offline-engine",
            initializer=torch.set_num_threads if args.engine_threads else None,
            initargs=(args.engine_threads,) if args.engine_threads else (),
        )
        warmup = SamplingParams(temperature=0.0, max_tokens=4)
        self._worker.submit(self.llm.generate, self.prompts[:1], warmup).result()

    def run(self, c: int, n: int) -> LevelResult:
        return self._worker.submit(self._run, c, n).result()

    def _run(self, c: int, n: int) -> LevelResult:
        ttfts, tpots, tokens = [], [], 0
        start = time.perf_counter()
        for w in range(0, n, c):
            for o in self.llm.generate(self.prompts[w:w + c], self.params):
                m, k = o.metrics, len(o.outputs[0].token_ids)
                tokens += k
                ttfts.append(m.first_token_time - m.arrival_time)
                if k > 1:
                    tpots.append((m.last_token_time - m.first_token_time) / (k - 1))
        return summarize("offline", c, ttfts, tpots, tokens, time.perf_counter() - start, n)


def engine_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name, value in engine_kwargs(args).items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def engine_kwargs(args: argparse.Namespace) -> dict:
    kw = {"dtype": args.dtype, "max_model_len": args.max_model_len}
    if args.load_format:
        kw["load_format"] = args.load_format
    return kw


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=2,
                   help="requests per concurrency level = this x concurrency (at least 4)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--load-format", default=None)
    p.add_argument("--engine-threads", type=int, default=None,
                   help="torch threads of both engines (default: what soar serve picks)")
    p.add_argument("--trials", type=int, default=2,
                   help="alternating trials per level and side; the best one counts")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--out", default="results/serve_load.json")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.engine_threads is None:  # what `soar serve` picks by itself, used on both sides
        from soarllm.config import EngineArgs
        from soarllm.serve.config import engine_threads_for

        device = EngineArgs(model=args.model).resolved_device()
        args.engine_threads = engine_threads_for(None, device)
    levels = [(c, max(4, c * args.requests_per_client)) for c in args.concurrency]

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    proc, url = launch_server(args, out_path.with_suffix(".server.log"))
    served, offline = [], []
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        # Both engines are loaded; only one works at a time (the idle server's engine thread
        # blocks). Trials alternate between the two so that a slow spell of a shared machine hits
        # both sides alike, and each side keeps its best trial.
        local = Offline(args, max(args.concurrency), max(n for _, n in levels))
        for c, n in levels:
            trials_s, trials_o = [], []
            for _ in range(args.trials):
                trials_s.append(asyncio.run(drive(url, model, c, n, args.output_len)))
                trials_o.append(local.run(c, n))
            served.append(max(trials_s, key=lambda r: r.output_tok_s))
            offline.append(max(trials_o, key=lambda r: r.output_tok_s))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    print(f"\nmodel {args.model}, {args.output_len} output tokens per request, "
          f"streaming chat requests, closed loop; {os.cpu_count()} CPUs, engine threads "
          f"{args.engine_threads or 'torch default'}")
    head = (f"{'side':8} {'conc':>4} {'reqs':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'TPOT p50':>9} {'TPOT p99':>9}")
    print(head + "   (ms)\n" + "-" * len(head))
    ratios = {}
    for s, o in zip(served, offline):
        for r in (s, o):
            print(f"{r.side:8} {r.concurrency:>4} {r.requests:>4} {r.output_tok_s:>8.1f} "
                  f"{r.ttft_ms_p50:>9.1f} {r.ttft_ms_p99:>9.1f} {r.tpot_ms_p50:>9.1f} "
                  f"{r.tpot_ms_p99:>9.1f}")
        ratios[s.concurrency] = s.output_tok_s / o.output_tok_s
        print(f"{'':8} {'':>4} serve/offline throughput = {ratios[s.concurrency]:.3f}")
    top = max(ratios)
    print(f"\nconcurrency {top}: serving reaches {100 * ratios[top]:.1f}% of offline throughput "
          f"(target >= 90%)")
    out_path.write_text(json.dumps({
        "model": args.model, "output_len": args.output_len, "levels": levels,
        "trials": args.trials, "engine_threads": args.engine_threads,
        "serve": [asdict(r) for r in served], "offline": [asdict(r) for r in offline],
        "throughput_ratio": {str(k): v for k, v in ratios.items()},
    }, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
