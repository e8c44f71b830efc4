"""Perplexity of the default model at full precision vs its `soar quantize`d copies, side by side.

Full precision is the default GGUF dequantized (quantization="none"); the copies are written by
`soar quantize` from those same weights: W8A16 RTN, W4A16 RTN, GPTQ and AWQ (same group size,
the largest of 128/64/32 dividing every layer: 64 for SmolLM2-135M), W8A8 RTN and SmoothQuant
(int8 activations per token: the rows need soarllm's W8A8 serving). Perplexity is `soar eval
ppl`'s machinery (sliding windows) on held-out text the project did not write: standard-library
source and Python reference prose (GPTQ, AWQ and SmoothQuant calibrate on other stdlib files and
the prose's second half). All models run in the same --dtype.

    python benchmarks/quantize_accuracy.py --out benchmarks/results/quantize_accuracy

Writes OUT/quantize_accuracy.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
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
    args = ap.parse_args()

    from soarllm.cli.main import main as soar
    from soarllm.eval.backends import LocalBackend
    from soarllm.eval.perplexity import corpus_perplexity
    from soarllm.hub import resolve_model

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model(args.model))
    rows = []
    for name in args.variants.split(","):
        flags = VARIANTS[name]
        path, seconds = model, None
        if flags is not None:
            path = str(args.work / name)
            if not Path(path).exists():  # reuse a copy written by an earlier run
                t0 = time.perf_counter()
                extra = (["--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]
                         if any(m in flags for m in CALIBRATED) else [])
                if soar(["quantize", model, *flags, *extra, "--out", path]) != 0:
                    return 1
                seconds = time.perf_counter() - t0
        backend = LocalBackend(path, dtype=args.dtype, max_model_len=args.window + 8,
                               quantization="none" if flags is None else None)
        row = {"variant": name, "path": path, "quantize_seconds": seconds, "ppl": {}}
        for corpus in args.corpus.split(","):
            r = corpus_perplexity(backend, corpus, max_tokens=args.max_tokens, window=args.window,
                                  stride=args.stride, progress=True)
            row["ppl"][corpus] = r.perplexity
        if flags is not None:
            row["bytes"] = sum(f.stat().st_size for f in Path(path).iterdir())
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del backend
    base = rows[0]["ppl"]
    corpora = list(base)
    lines = ["| variant | " + " | ".join(f"ppl {c} (vs fp)" for c in corpora) + " | size MiB |",
             "|---|" + "---|" * (len(corpora) + 1)]
    for row in rows:
        cells = [f"{row['ppl'][c]:.3f} ({100 * (row['ppl'][c] / base[c] - 1):+.2f}%)" for c in corpora]
        size = f"{row['bytes'] / 2**20:.0f}" if "bytes" in row else "-"
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + f" | {size} |")
    table = "\n".join(lines)
    print(table)
    doc = {"schema": "soarllm.bench.quantize_accuracy/1", "model": args.model,
           "command": " ".join(sys.argv), "max_tokens": args.max_tokens, "window": args.window,
           "stride": args.stride, "dtype": args.dtype, "rows": rows, "table": table}
    (args.out / "quantize_accuracy.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
