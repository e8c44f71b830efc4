"""Resident memory of `soar serve` against llama-server on the same GGUF, side by side in one run.

Both servers get the same KV capacity (4,096 tokens: llama-server `-c 4096 -np 8`, soarllm
`--max-model-len 512 --kv-cache-memory <the bytes of 4,096 tokens>`), serve the same load (8
concurrent streamed completions of 128 tokens, twice), and are measured from start to stop:

* ``peak_rss_mb``: the highest sum of RSS over the server's process tree (bench/launch.py's
  sampler; shared pages, e.g. libtorch mapped by two processes, count once per process);
* ``pss_mb``: after the load, the sum of proportional set sizes over the tree (a shared page
  counts once in total), the fairest single figure for a multi-process server.

soarllm rows: the default layout (HTTP process + model worker process, compiled model step) and
the variants that trade speed for memory (`--distributed-executor-backend uni`: one process;
`--enforce-eager`: no inductor).

    python benchmarks/serve_memory.py --out benchmarks/results/serve_memory
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

KV_TOKENS = 4096


def tree_pss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_full_info().pss for p in [root, *root.children(recursive=True)]) / 2**20


async def load(endpoint, model: str, streams: int, tokens: int) -> None:
    import httpx

    from soarllm.bench.client import send_request
    from soarllm.bench.workloads import SampleRequest

    async with httpx.AsyncClient(timeout=600) as client:
        reqs = [SampleRequest(f"Write a story about the number {i}.", 10, tokens, "load")
                for i in range(streams)]
        results = await asyncio.gather(*(send_request(client, endpoint, r, model) for r in reqs))
    failed = [r.error for r in results if not r.success]
    if failed:
        raise RuntimeError(f"load failed: {failed[0]}")


def measure(label: str, command: str, port: int, log_dir: Path) -> dict:
    import httpx

    from soarllm.bench.client import Endpoint, first_model
    from soarllm.bench.launch import LaunchedServer

    endpoint = Endpoint(label=label, url=f"http://127.0.0.1:{port}", api="completions")
    with LaunchedServer(command, endpoint, log_path=log_dir / f"{label}.log") as server:

        async def model_name() -> str:
            async with httpx.AsyncClient(timeout=30) as client:
                return await first_model(client, endpoint)

        model = asyncio.run(model_name())
        for _ in range(2):
            asyncio.run(load(endpoint, model, 8, 128))
        pss = tree_pss_mb(server.pid)
    return {"label": label, "command": command, "peak_rss_mb": server.ease.peak_rss_mb,
            "pss_mb": pss, "time_to_ready_s": server.ease.time_to_ready_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name or .gguf file")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--variants", default="default,uni,eager,uni+eager",
                    help="soarllm rows: default | uni | eager | uni+eager")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/serve_memory")
    args = ap.parse_args()

    from soarllm import hub
    from soarllm.model.loader import load_checkpoint

    gguf = args.model if args.model.endswith(".gguf") else str(hub.pull(args.model))
    cfg = load_checkpoint(gguf).config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # bfloat16 K and V for every layer and KV head: the same bytes as llama.cpp's f16 cache
    kv_bytes = KV_TOKENS * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cpu_vs_llamacpp import build_llamacpp

    bin_dir = build_llamacpp()
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = [measure("llama-server", f"{bin_dir / 'llama-server'} -m {gguf} -t {args.threads} "
                    f"-np 8 -c {KV_TOKENS} --port 18401", 18401, args.out)]
    flags = {"default": "", "uni": "--distributed-executor-backend uni",
             "eager": "--enforce-eager",
             "uni+eager": "--distributed-executor-backend uni --enforce-eager"}
    for i, name in enumerate(args.variants.split(",")):
        port = 18410 + i
        cmd = (f"env OMP_NUM_THREADS={args.threads} {py} -m soarllm.cli.main serve {gguf} "
               f"--port {port} --no-access-log --log-level warning --max-model-len 512 "
               f"--max-num-seqs 8 --kv-cache-memory {kv_bytes} {flags[name]}")
        rows.append(measure(f"soar serve ({name})", cmd.strip(), port, args.out))
    base = rows[0]
    lines = [f"KV capacity {KV_TOKENS} tokens ({kv_bytes / 2**20:.0f} MiB) each; GGUF "
             f"{Path(gguf).stat().st_size / 2**20:.0f} MiB", "",
             "| server | peak RSS MiB | PSS after load MiB | PSS / llama-server |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['peak_rss_mb']:.0f} | {r['pss_mb']:.0f} | "
                     f"{r['pss_mb'] / base['pss_mb']:.2f}x |")
    report = "\n".join(lines)
    print(report)
    (args.out / "results.json").write_text(json.dumps({"model": gguf, "rows": rows}, indent=1))
    (args.out / "report.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
