"""soar serve vs llama.cpp's OpenAI server on the same GGUF with the same thread count.

Both servers are launched by `soar bench serve` (so time to first token and peak RSS are measured
too) and loaded with the same random workload at concurrency 1, 8 and 32. llama.cpp's server has
no ``ignore_eos``, so EOS is also biased away (``--eos-logit-bias``) to give both the same output
lengths; it serves one request at a time, so ``--interrupt_requests False`` keeps it from cutting
streams short under concurrency.

    python benchmarks/lace_side_by_side.py --threads 2 --out benchmarks/results/lace_side_by_side

writes results.json, report.md (with the ratio table), latency_throughput.png and
distributions.png into --out.
"""

from __future__ import annotations

import argparse
import sys

from soarllm import hub
from soarllm.cli.main import main as soar
from soarllm.config import DEFAULT_MODEL


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name or .gguf file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--soar-port", type=int, default=18100)
    p.add_argument("--llama-port", type=int, default=18101)
    p.add_argument("--out", default="benchmarks/results/lace_side_by_side")
    args = p.parse_args()

    gguf = args.model if args.model.endswith(".gguf") else str(hub.pull(args.model))
    py = sys.executable
    threads = f"env OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads}"
    soar_cmd = (f"{threads} {py} -m soarllm.cli.main serve {gguf} --port {args.soar_port} "
                "--no-access-log --log-level warning")
    llama_cmd = (f"{py} -m llama_cpp.server --model {gguf} --n_threads {args.threads} "
                 f"--n_threads_batch {args.threads} --port {args.llama_port} --n_ctx 4096 "
                 "--interrupt_requests False")
    return soar([
        "bench", "serve",
        "--endpoint", f"soar=http://127.0.0.1:{args.soar_port}", "--launch", soar_cmd,
        "--endpoint", f"llama.cpp=http://127.0.0.1:{args.llama_port}", "--launch", llama_cmd,
        "--tokenizer", gguf, "--eos-logit-bias", "llama.cpp",
        "--workload", "random", "--num-prompts", str(args.num_prompts),
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--concurrency", args.concurrency, "--warmup", "2", "--output-dir", args.out,
    ])


if __name__ == "__main__":
    sys.exit(main())
