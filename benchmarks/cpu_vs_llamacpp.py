"""soarllm vs llama.cpp on this CPU, same GGUF, same thread count, one run: decode at batch 1 / 8 / 32,
prefill of a 512-token prompt, and serving 8 concurrent streams over HTTP.

llama.cpp is built from source with ../shared/tools/build-llamacpp.sh (cached after the first time).
Its figures come from its own tools: llama-bench (pp512, tg128) and llama-batched-bench (S_TG at
B = 1, 8, 32 with 128 prompt + 128 generated tokens per sequence), and llama-server -np 8 for the
HTTP row. Ours are measured the same way through the offline API (prefix caching off, greedy,
ignore_eos): S_TG = B * TG / (T - T_PP) with T_PP the time until every sequence has its first token,
as llama-batched-bench defines it; prefill = 512 / TTFT of one 512-token prompt. The HTTP row uses
`soar bench serve` against both servers (24 requests, 128 in / 128 out, 1 and 8 at a time),
--http-repeats times with the two servers alternating, best of the runs per row (every run and the
per-run c=8 ratio are printed too: this host's speed drifts by 10-40% between minutes).

    python benchmarks/cpu_vs_llamacpp.py --threads 2 --out benchmarks/results/cpu_vs_llamacpp

Each figure is the best of --repeats runs. Run it on a quiet machine: nothing else on the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO.parent / "shared" / "tools" / "build-llamacpp.sh"


def build_llamacpp() -> Path:
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def llama_bench(bin_dir: Path, gguf: str, threads: int, repeats: int) -> dict[str, float]:
    out = subprocess.run(
        [str(bin_dir / "llama-bench"), "-m", gguf, "-t", str(threads), "-p", "512", "-n", "128",
         "-r", str(repeats), "-o", "json"], check=True, capture_output=True, text=True,
    ).stdout
    rows = json.loads(out)
    res = {}
    for row in rows:
        if row.get("n_prompt") == 512 and row.get("n_gen") == 0:
            res["prefill_512"] = float(row["avg_ts"])
        elif row.get("n_gen") == 128 and row.get("n_prompt") == 0:
            res["decode_b1"] = float(row["avg_ts"])
    return res


def llama_batched(bin_dir: Path, gguf: str, threads: int, batches: list[int],
                  repeats: int) -> dict[int, float]:
    best: dict[int, float] = {}
    for _ in range(repeats):
        out = subprocess.run(
            [str(bin_dir / "llama-batched-bench"), "-m", gguf, "-t", str(threads), "-tb",
             str(threads), "-c", str(max(batches) * 256 + 256), "-b", "2048", "-ub", "512",
             "-npp", "128", "-ntg", "128", "-npl", ",".join(map(str, batches)),
             "--output-format", "jsonl"], check=True, capture_output=True, text=True,
        ).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                b = int(row["pl"])
                best[b] = max(best.get(b, 0.0), float(row["speed_tg"]))
    return best


def soar_offline(gguf: str, dtype: str, batches: list[int], repeats: int,
                 enforce_eager: bool = False, quantization: str | None = None,
                 attention_backend: str | None = None) -> dict[str, float]:
    import numpy as np

    from soarllm import LLM, SamplingParams

    llm = LLM(gguf, dtype=dtype, enable_prefix_caching=False, max_num_seqs=max(batches),
              enforce_eager=enforce_eager, quantization=quantization,
              attention_backend=attention_backend)
    rng = np.random.default_rng(0)
    vocab = llm.get_tokenizer().vocab_size

    def prompts(n: int, length: int) -> list[list[int]]:
        return [rng.integers(100, vocab - 100, size=length).tolist() for _ in range(n)]

    sp = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    llm.generate(prompts(2, 32), SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    res: dict[str, float] = {}
    for b in batches:
        best = 0.0
        for _ in range(repeats):
            start = time.time()
            outs = llm.generate(prompts(b, 128), sp)
            end = time.time()
            t_pp = max(o.metrics.first_token_time for o in outs) - start
            n_tg = sum(len(o.outputs[0].token_ids) for o in outs)
            best = max(best, n_tg / (end - start - t_pp))
        res[f"decode_b{b}"] = best
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    best = 0.0
    for _ in range(repeats):
        start = time.time()
        out = llm.generate(prompts(1, 512), one)[0]
        best = max(best, 512 / (out.metrics.first_token_time - start))
    res["prefill_512"] = best
    del llm
    return res


def http_row(bin_dir: Path, gguf: str, threads: int, out_dir: Path,
             repeats: int = 3) -> dict[str, dict[str, float]]:
    """``soar bench serve`` against both servers, ``repeats`` times (each time soarllm's server,
    then llama-server's, one at a time: the two alternate), best of the repeats per row: the
    highest output tok/s and the lowest median TPOT, every run kept under ``runs``."""
    py = sys.executable
    env = f"env OMP_NUM_THREADS={threads}"
    # --load-compiled-first: steady-state serving from the first measured request (by default
    # a restarted server answers eagerly for the ~2 s its compiled step takes to load)
    soar_cmd = (f"{env} {py} -m soarllm.cli.main serve {gguf} --port 18200 --no-access-log "
                "--log-level warning --no-enable-prefix-caching --load-compiled-first")
    llama_cmd = (f"{bin_dir / 'llama-server'} -m {gguf} -t {threads} -np 8 -c {8 * 512} "
                 "--port 18201")
    rows: dict[str, dict] = {}
    for r in range(repeats):
        run_dir = out_dir / "http" / f"run{r + 1}"
        subprocess.run(
            [py, "-m", "soarllm.cli.main", "bench", "serve",
             "--endpoint", "soar=http://127.0.0.1:18200", "--launch", soar_cmd,
             "--endpoint", "llama.cpp=http://127.0.0.1:18201", "--launch", llama_cmd,
             "--tokenizer", gguf, "--eos-logit-bias", "llama.cpp", "--workload", "random",
             "--num-prompts", "24", "--input-len", "128", "--output-len", "128",
             "--concurrency", "1,8", "--warmup", "2", "--output-dir", str(run_dir)],
            check=True,
        )
        doc = json.loads((run_dir / "results.json").read_text())
        for ep in doc["endpoints"]:
            for run in ep["runs"]:
                m = run["metrics"]
                row = rows.setdefault(f"{ep['label']} {run['load']['label']}", {"runs": []})
                row["runs"].append({"output_tok_s": m["output_throughput"],
                                    "tpot_ms_median": m["tpot_ms"]["median"]})
    for row in rows.values():
        row["output_tok_s"] = max(x["output_tok_s"] for x in row["runs"])
        row["tpot_ms_median"] = min(x["tpot_ms_median"] for x in row["runs"])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name or .gguf file")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--dtypes", default="bfloat16,bfloat16:eager,float32",
                   help="soarllm rows: dtypes, ':eager' for the uncompiled model step, "
                   "':attn=NAME' for attention_backend=NAME (e.g. reference), ':q=X' "
                   "for quantization=X (e.g. bfloat16:q=none: the GGUF dequantized to bfloat16; "
                   "unset: the GGUF's own blocks on the int4/int8 kernels), ':w4=X' for "
                   "SOARLLM_W4A16_CPU=X (torch: bfloat16 activations into the int4 kernels, "
                   "native: soarllm's bfloat16 int4 layout; unset: auto, int8 activations on "
                   "AVX-512 VNNI)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-http", dest="http", action="store_false")
    p.add_argument("--http-repeats", type=int, default=3,
                   help="HTTP runs, soarllm and llama-server alternating; best of them per row")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cpu_vs_llamacpp")
    args = p.parse_args()

    import torch

    from soarllm import hub

    torch.set_num_threads(args.threads)
    gguf = args.model if args.model.endswith(".gguf") else str(hub.pull(args.model))
    batches = [int(b) for b in args.batches.split(",")]
    bin_dir = build_llamacpp()
    table: dict[str, dict[str, float]] = {}
    llama = llama_bench(bin_dir, gguf, args.threads, args.repeats)
    for b, v in llama_batched(bin_dir, gguf, args.threads, batches, args.repeats).items():
        if b != 1:
            llama[f"decode_b{b}"] = v
    table["llama.cpp"] = llama
    for spec in args.dtypes.split(","):
        dtype, *modes = spec.split(":")
        quant = next((m[2:] for m in modes if m.startswith("q=")), None)
        attn = next((m[5:] for m in modes if m.startswith("attn=")), None)
        w4 = next((m[3:] for m in modes if m.startswith("w4=")), "auto")
        name = (f"soarllm {dtype}" + (" eager" if "eager" in modes else "")
                + (f" quantization={quant}" if quant else "")
                + (f" attention={attn}" if attn else "") + (f" w4a16={w4}" if w4 != "auto" else ""))
        os.environ["SOARLLM_W4A16_CPU"] = w4  # read when the layers are packed
        table[name] = soar_offline(gguf, dtype, batches, args.repeats,
                                   enforce_eager="eager" in modes, quantization=quant,
                                   attention_backend=attn)
        os.environ.pop("SOARLLM_W4A16_CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"model": gguf, "threads": args.threads, "table": table}
    if args.http:
        doc["http"] = http_row(bin_dir, gguf, args.threads, args.out, args.http_repeats)
    cols = [f"decode_b{b}" for b in batches] + ["prefill_512"]
    lines = ["| tok/s | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row.get(c, float('nan')):.1f}" for c in cols) + " |")
    for name, row in table.items():
        if name != "llama.cpp":
            lines.append(f"| {name} / llama.cpp | " + " | ".join(
                f"{row.get(c, float('nan')) / llama.get(c, float('nan')):.2f}x" for c in cols) + " |")
    if args.http:
        lines += ["", f"| HTTP (24 req, 128 in/out; best of {args.http_repeats}, alternating) | "
                  "output tok/s | TPOT median ms | every run: tok/s |", "|---|---|---|---|"]
        for name, row in doc["http"].items():
            every = " / ".join(f"{x['output_tok_s']:.1f}" for x in row["runs"])
            lines.append(f"| {name} | {row['output_tok_s']:.1f} | {row['tpot_ms_median']:.1f} | "
                         f"{every} |")
        h = doc["http"]
        if "soar c=8" in h and "llama.cpp c=8" in h:
            ratios = " / ".join(f"{a['output_tok_s'] / b['output_tok_s']:.2f}x" for a, b in
                                zip(h["soar c=8"]["runs"], h["llama.cpp c=8"]["runs"]))
            lines.append(f"| soar / llama.cpp c=8 | "
                         f"{h['soar c=8']['output_tok_s'] / h['llama.cpp c=8']['output_tok_s']:.2f}x"
                         f" | | per run: {ratios} |")
    report = "\n".join(lines)
    print(report)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    (args.out / "report.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
