"""Planner error on this machine: decode throughput and TTFT predicted vs measured.

1. `soar bench offline` on the default model measures batches of 1 to 64 prompts submitted
   together (TTFT and TPOT per batch), once per input length: with a single length the fit
   cannot tell compute from memory efficiency (see soarllm.plan.calibrate), with two it can.
2. `soar plan --calibrate` predicts the same points with this machine's measured roofline, before
   and after fitting the efficiency factors, and reports MAPE (target: <= 15% after), both
   in-sample and on the batch sizes held out of the fit.

    python benchmarks/plan_error.py --out benchmarks/results/plan_error

writes offline_in<L>.json for each input length, calibration.md and calibration.json into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from soarllm.cli.main import main as soar
from soarllm.config import DEFAULT_MODEL


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--input-lens", default="32,128", help="comma list: one bench run per length")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="best-of runs per batch size")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_error"))
    p.add_argument("--skip-bench", action="store_true", help="reuse --out/offline_in<L>.json")
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for length in [int(x) for x in args.input_lens.split(",")]:
        path = args.out / f"offline_in{length}.json"
        results.append(str(path))
        if args.skip_bench:
            continue
        code = soar(["bench", "offline", args.model, "--num-prompts", "8",
                     "--input-len", str(length), "--output-len", str(args.output_len),
                     "--batch-sizes", args.batch_sizes, "--repeats", str(args.repeats),
                     "--output-json", str(path)])
        if code:
            return code
    code = soar(["plan", "--calibrate", *results, "--model", args.model,
                 "--hardware", "this", "--output-dir", str(args.out)])
    if code == 0:
        cal = json.loads((args.out / "calibration.json").read_text())
        print(json.dumps({"mape_percent": cal["mape_percent"], "held_out": cal["held_out"],
                          "warnings": cal["warnings"]}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
