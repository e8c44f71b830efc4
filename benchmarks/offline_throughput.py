"""Offline throughput, side by side in one run: soarllm vs transformers `generate` (vs llama.cpp).

Workload (issue #2): 64 requests, prompt lengths spread evenly over 32-512 tokens (windows of the
Python standard library's source), 128 output tokens each, ignore_eos. Also batch-1 decode tokens/s
and the time from process start to the first generated token of `soar generate`.

transformers runs batched with left padding at several batch sizes; a configuration counts as
correct when its greedy output for the first requests equals transformers' own unbatched output in
the same dtype. The best correct configuration is the one we compare with.

    python benchmarks/offline_throughput.py                  # everything, writes results/*.json
    python benchmarks/offline_throughput.py --quick          # 16 requests, fewer configs
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def make_prompts(tok, n: int, lo: int, hi: int) -> list[list[int]]:
    import argparse as a
    import collections
    import json as j
    import typing

    text = "\n".join(inspect.getsource(m) for m in (a, collections, j, typing))
    ids = tok.encode(text)
    lens = [round(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]
    # interleave lengths so every batch of consecutive requests mixes short and long prompts
    order = sorted(range(n), key=lambda i: (i * 7919) % n)
    out = []
    for k, i in enumerate(order):
        start = (k * 997) % (len(ids) - hi)
        out.append(ids[start : start + lens[i]])
    return out


def run_soar(model: str, prompts, out_len: int, dtype: str, n_check: int) -> dict:
    from soarllm import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, max_num_seqs=len(prompts))
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    b1 = batch1_decode_soar(llm, prompts[0][:32], out_len)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts[:n_check]]
    return {
        "engine": "soarllm", "dtype": dtype, "seconds": dt, "output_tokens": n_out,
        "output_tok_s": n_out / dt, "batch1_decode_tok_s": b1,
        "outputs": [o.outputs[0].token_ids for o in outs],
        # same criterion as for transformers: batched output equals unbatched output
        "correct": [o.outputs[0].token_ids for o in outs[:n_check]] == alone,
    }


def batch1_decode_soar(llm, prompt, out_len):
    from soarllm import SamplingParams

    engine = llm.llm_engine
    engine.add_request("b1", prompt, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True))
    first = None
    n = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            n = len(o.outputs[0].token_ids)
            if first is None:
                first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - first)


def load_hf(gguf_path: Path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype
    ).eval()


def hf_generate(model, tok, prompts, out_len, batch_size):
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outs = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b : b + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            gen = model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=out_len,
                min_new_tokens=out_len, pad_token_id=pad,
            )
        outs.extend(gen[:, width:].tolist())
    return outs


def run_hf(gguf_path, tok, prompts, out_len, dtype_name, batch_sizes, n_check):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    model = load_hf(gguf_path, dtype)
    reference = hf_generate(model, tok, prompts[:n_check], out_len, 1)  # unbatched oracle
    results = []
    for bsz in batch_sizes:
        t = time.perf_counter()
        outs = hf_generate(model, tok, prompts, out_len, bsz)
        dt = time.perf_counter() - t
        n_out = sum(len(o) for o in outs)
        correct = outs[:n_check] == reference
        results.append({
            "engine": "transformers", "dtype": dtype_name, "batch_size": bsz, "seconds": dt,
            "output_tokens": n_out, "output_tok_s": n_out / dt, "correct": correct,
        })
        print(f"  transformers {dtype_name} batch {bsz}: {n_out / dt:.1f} tok/s, "
              f"correct={correct}", flush=True)
    # batch-1 decode
    ids = torch.tensor([prompts[0][:32]])
    with torch.inference_mode():
        model.generate(ids, do_sample=False, max_new_tokens=2, min_new_tokens=2)
        t = time.perf_counter()
        model.generate(ids, do_sample=False, max_new_tokens=1, min_new_tokens=1)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, do_sample=False, max_new_tokens=out_len, min_new_tokens=out_len)
        dt = time.perf_counter() - t - prefill
    return results, reference, (out_len - 1) / dt


def run_llama_cpp(gguf_path, prompts, out_len, threads):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    t = time.perf_counter()
    n_out = 0
    for p in prompts:
        llm.reset()
        for i, _ in enumerate(llm.generate(p, temp=0.0, top_k=1, reset=True)):
            n_out += 1
            if i + 1 >= out_len:
                break
    dt = time.perf_counter() - t
    # batch-1 decode
    llm.reset()
    gen = llm.generate(prompts[0][:32], temp=0.0, top_k=1, reset=True)
    next(gen)
    t = time.perf_counter()
    for i, _ in enumerate(gen):
        if i + 2 >= out_len:
            break
    b1 = (out_len - 1) / (time.perf_counter() - t)
    return {"engine": "llama.cpp", "dtype": "gguf (Q4_1 as shipped)", "seconds": dt,
            "output_tokens": n_out, "output_tok_s": n_out / dt, "batch1_decode_tok_s": b1,
            "note": "llama-cpp-python runs one sequence at a time"}


def first_token_latency(model: str) -> float:
    """Seconds from starting `soar generate` to its first generated byte on stdout."""
    t = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "soarllm.cli.main", "generate", "Hello", "--model", model,
         "--max-tokens", "8", "--ignore-eos"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    proc.stdout.read(1)
    dt = time.time() - t
    proc.wait()
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--hf-batch-sizes", default="8,16,32,64")
    ap.add_argument("--check", type=int, default=4, help="requests checked against unbatched output")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/offline_throughput.json")
    args = ap.parse_args()
    if args.quick:
        args.num_requests, args.output_len, args.hf_batch_sizes = 16, 32, "16"
    from soarllm.hub import resolve_model
    from soarllm.model.loader import load_checkpoint
    from soarllm.model.tokenizer import load_tokenizer

    gguf_path = Path(resolve_model(args.model))
    tok = load_tokenizer(load_checkpoint(args.model))
    prompts = make_prompts(tok, args.num_requests, args.min_len, args.max_len)
    threads = torch.get_num_threads()
    report = {"machine": {"threads": threads, "cpu_count": os.cpu_count()}, "workload": {
        "num_requests": len(prompts), "prompt_tokens": sum(map(len, prompts)),
        "output_len": args.output_len}, "runs": []}
    print(f"workload: {len(prompts)} requests, {report['workload']['prompt_tokens']} prompt tokens, "
          f"{args.output_len} output tokens each; {threads} threads", flush=True)

    ttft = first_token_latency(args.model)
    report["soar_generate_first_token_s"] = ttft
    print(f"soar generate: first token {ttft:.2f}s after process start", flush=True)

    summary = []
    for dtype in args.dtypes.split(","):
        soar = run_soar(args.model, prompts, args.output_len, dtype, args.check)
        print(f"  soarllm {dtype}: {soar['output_tok_s']:.1f} tok/s, batch-1 decode "
              f"{soar['batch1_decode_tok_s']:.1f} tok/s", flush=True)
        hf_runs, reference, hf_b1 = run_hf(
            gguf_path, tok, prompts, args.output_len, dtype,
            [int(b) for b in args.hf_batch_sizes.split(",")], args.check,
        )
        soar["equals_transformers_unbatched"] = soar.pop("outputs")[: args.check] == reference
        report["runs"].append(soar)
        report["runs"].extend(hf_runs)
        report["runs"].append({"engine": "transformers", "dtype": dtype, "batch1_decode_tok_s": hf_b1})
        summary.append((dtype, soar, hf_runs, hf_b1))

    if not args.no_llama_cpp:
        lc = run_llama_cpp(gguf_path, prompts, args.output_len, threads)
        if lc:
            report["runs"].append(lc)

    all_hf = [r for _, _, runs, _ in summary for r in runs]
    best_hf = max((r for r in all_hf if r["correct"]), key=lambda r: r["output_tok_s"], default=None)
    best_hf_b1 = max(b1 for *_, b1 in summary)
    print("\ncorrect = batched greedy output equals the same engine's unbatched output, same dtype")
    print("| engine | dtype | config | output tok/s | batch-1 decode tok/s | correct | = HF unbatched |")
    print("|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        if "output_tok_s" not in r:
            continue
        cfg = (f"batch {r['batch_size']}" if "batch_size" in r
               else "one sequence at a time" if r["engine"] == "llama.cpp" else "continuous batching")
        print(f"| {r['engine']} | {r['dtype']} | {cfg} | {r['output_tok_s']:.1f} | "
              f"{r.get('batch1_decode_tok_s', float('nan')):.1f} | {r.get('correct', '-')} | "
              f"{r.get('equals_transformers_unbatched', '-')} |")
    for dtype, _soar, _runs, hf_b1 in summary:
        print(f"| transformers | {dtype} | batch-1 decode | - | {hf_b1:.1f} | - |")
    best_soar = max((s for _, s, _, _ in summary if s["correct"]), key=lambda r: r["output_tok_s"],
                    default=max((s for _, s, _, _ in summary), key=lambda r: r["output_tok_s"]))
    if best_hf:
        ratio = best_soar["output_tok_s"] / best_hf["output_tok_s"]
        print(f"\nthroughput: soarllm {best_soar['dtype']} {best_soar['output_tok_s']:.1f} tok/s vs "
              f"transformers' best correct ({best_hf['dtype']}, batch {best_hf['batch_size']}) "
              f"{best_hf['output_tok_s']:.1f} tok/s: ratio {ratio:.2f}x (target >= 1.5x)")
        report["throughput_ratio_vs_transformers"] = ratio
    b1 = max(s["batch1_decode_tok_s"] for _, s, _, _ in summary)
    print(f"batch-1 decode: soarllm {b1:.1f} tok/s vs transformers {best_hf_b1:.1f} tok/s: "
          f"ratio {b1 / best_hf_b1:.2f}x (target >= 1.0x)")
    lc = next((r for r in report["runs"] if r["engine"] == "llama.cpp"), None)
    if lc:
        print(f"llama.cpp: {lc['output_tok_s']:.1f} tok/s offline, {lc['batch1_decode_tok_s']:.1f} "
              f"tok/s batch-1; soarllm/llama.cpp throughput ratio "
              f"{best_soar['output_tok_s'] / lc['output_tok_s']:.2f}x")
    print(f"soar generate first token: {ttft:.2f}s (target <= 15s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
