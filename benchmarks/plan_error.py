"""Planner error on this machine: decode throughput and TTFT predicted vs measured.

1. `soar bench offline` on the default model measures batches of 1 to 64 prompts submitted
   together (TTFT and TPOT per batch).
2. `soar plan --calibrate` predicts the same points with this machine's measured roofline, before
   and after fitting the efficiency factors, and reports MAPE (target: <= 15% after).

    python benchmarks/plan_error.py --out benchmarks/results/plan_error

writes offline.json, calibration.md and calibration.json into --out.
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
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="best-of runs per batch size")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_error"))
    p.add_argument("--skip-bench", action="store_true", help="reuse --out/offline.json")
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    offline = args.out / "offline.json"
    if not args.skip_bench:
        code = soar(["bench", "offline", args.model, "--num-prompts", "8",
                     "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                     "--batch-sizes", args.batch_sizes, "--repeats", str(args.repeats),
                     "--output-json", str(offline)])
        if code:
            return code
    code = soar(["plan", "--calibrate", str(offline), "--model", args.model,
                 "--hardware", "this", "--output-dir", str(args.out)])
    if code == 0:
        mape = json.loads((args.out / "calibration.json").read_text())["mape_percent"]
        print(json.dumps(mape, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
