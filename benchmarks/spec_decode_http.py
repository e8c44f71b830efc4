"""Speculative decoding over HTTP: `soar serve` without and with a server-wide proposer, side by
side in one run, through `soar bench serve` (streamed requests, the server's own tokenizer and
scheduling, every layer a user pays for).

Both servers serve the default model with the same flags; the second adds
``--speculative-config`` (default: prompt lookup, ``{"method": "ngram", ...}``; the planner
turns it down where it does not pay). Workload ``code``: half the requests continue a standard
library file, half rewrite one of its functions with type hints (the output repeats much of the
prompt: what prompt lookup is for). Greedy, 128 output tokens, concurrency 1 and 8.

    python benchmarks/spec_decode_http.py --out benchmarks/results/spec_decode_http

Each server is measured twice, once first and once second (the order matters on this machine);
prints the better output tok/s (and its median TPOT) per server and concurrency, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--speculative-config", default=NGRAM)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/spec_decode_http")
    args = ap.parse_args()

    from soarllm import hub

    model = args.model if Path(args.model).exists() else str(hub.pull(args.model))
    py = sys.executable
    base = (f"env OMP_NUM_THREADS={args.threads} {py} -m soarllm.cli.main serve {model} "
            "--no-access-log --log-level warning --no-enable-prefix-caching")
    spec = args.speculative_config.replace('"', '\\"')
    servers = {"plain": f"{base} --port 18501",
               "speculative": f'{base} --port 18502 --speculative-config "{spec}"'}
    ports = {"plain": 18501, "speculative": 18502}
    # both orders: the server measured second ran slower in a first version of this script (the
    # first one's worker still exiting, caches): each figure is the better of its two runs
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for order in (("plain", "speculative"), ("speculative", "plain")):
        out = args.out / "-then-".join(order)
        cmd = [py, "-m", "soarllm.cli.main", "bench", "serve"]
        for name in order:
            cmd += ["--endpoint", f"{name}=http://127.0.0.1:{ports[name]}", "--launch",
                    servers[name]]
        cmd += ["--tokenizer", model, "--workload", "code", "--num-prompts",
                str(args.num_prompts), "--output-len", "128", "--concurrency", args.concurrency,
                "--warmup", "2", "--output-dir", str(out)]
        subprocess.run(cmd, check=True)
        doc = json.loads((out / "results.json").read_text())
        for ep in doc["endpoints"]:
            for run in ep["runs"]:
                m = run["metrics"]
                best = rows.setdefault(run["load"]["label"], {}).get(ep["label"])
                if best is None or m["output_throughput"] > best["tok_s"]:
                    rows[run["load"]["label"]][ep["label"]] = {
                        "tok_s": m["output_throughput"], "tpot_ms": m["tpot_ms"]["median"]}
    lines = ["| load | plain tok/s | speculative tok/s | ratio | plain TPOT ms | speculative TPOT ms |",
             "|---|---|---|---|---|---|"]
    for load, r in rows.items():
        p, s = r["plain"], r["speculative"]
        lines.append(f"| {load} | {p['tok_s']:.1f} | {s['tok_s']:.1f} | {s['tok_s'] / p['tok_s']:.2f}x "
                     f"| {p['tpot_ms']:.1f} | {s['tpot_ms']:.1f} |")
    report = (f"speculative config: {args.speculative_config}\n\n" + "\n".join(lines))
    print(report)
    (args.out / "report.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
