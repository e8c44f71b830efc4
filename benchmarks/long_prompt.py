"""The longest prompt a tiny model prefills on this CPU: chunked prefill of one long prompt, time
per token and peak memory at each length (a fresh process per length, so each peak is its own).

The model is a tiny random Llama (1 layer, hidden 32, 2 query heads and 1 KV head of 16, float32,
random weights), so the figures are the engine's: the paged KV cache (one pool sized to the prompt),
the chunked prefill (--chunk tokens per step, each chunk attending to everything before it through
the reference attention backend) and the per-step bookkeeping. Attention makes time per token grow
linearly with the length (total time quadratic); memory should grow linearly: the KV pool, plus per
chunk the gathered keys/values and a [chunk, length] mask.

    python benchmarks/long_prompt.py --lengths 8192,16384,32768,65536 --out benchmarks/results/long_prompt

Prints one JSON line per length and writes long_prompt.json with a least-squares line of peak
memory against length (bytes per token, and R^2).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

BLOCK = 64


def model_dir(root: Path, max_len: int) -> Path:
    from tests.tiny import train_tokenizer

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32,
               intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=512, max_position_embeddings=max_len,
               hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
               eos_token_id=2, bos_token_id=1)
    (root / "config.json").write_text(json.dumps(cfg))
    train_tokenizer(root)
    return root


def child(length: int, chunk: int, directory: Path) -> dict:
    """Prefill one prompt of `length` tokens; runs in its own process."""
    import torch

    from soarllm import LLM, SamplingParams

    blocks = -(-(length + 1) // BLOCK)
    llm = LLM(str(directory), load_format="dummy", dtype="float32", enforce_eager=True,
              enable_prefix_caching=False, max_num_seqs=1, block_size=BLOCK,
              max_model_len=blocks * BLOCK, num_gpu_blocks_override=blocks,
              max_num_batched_tokens=chunk)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    prompt = torch.randint(3, 500, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    seconds = time.perf_counter() - t0
    assert len(out[0].outputs[0].token_ids) == 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kv = 2 * 1 * blocks * BLOCK * 1 * 16 * 4  # K and V, 1 layer, 1 KV head of 16, float32
    return {"tokens": length, "chunk": chunk, "seconds": round(seconds, 2),
            "us_per_token": round(seconds / length * 1e6, 1),
            "peak_rss_mib": round(peak / 2**20, 1),
            "rss_after_load_mib": round(base_rss / 2**20, 1),
            "kv_pool_mib": round(kv / 2**20, 2)}


def fit(xs: list[float], ys: list[float]) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    icpt = my - slope * mx
    ss_res = sum((y - (icpt + slope * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"bytes_per_token": round(slope), "intercept_mib": round(icpt / 2**20, 1),
            "r2": round(1 - ss_res / ss_tot, 5) if ss_tot else 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--chunk", type=int, default=1024, help="max_num_batched_tokens")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per length")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.chunk, args.dir)), flush=True)
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = model_dir(Path(tmp), max(lengths) + 2 * BLOCK)
        for length in lengths:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(length), "--chunk", str(args.chunk),
                 "--dir", str(directory)], capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"prefill of {length} tokens failed")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"model": "tiny Llama: 1 layer, hidden 32, 2 heads / 1 KV head of 16, float32",
              "rows": rows}
    if len(rows) >= 3:
        result["peak_rss_vs_tokens"] = fit([r["tokens"] for r in rows],
                                           [r["peak_rss_mib"] * 2**20 for r in rows])
        print(json.dumps(result["peak_rss_vs_tokens"]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "long_prompt.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
