"""Step cost of each speculative method against plain decoding, one request, on this machine.

One greedy request (a short Python prompt, --tokens generated, EOS ignored) through the engine's
own loop, once per method: decode steps, milliseconds per step, tokens per step and tok/s, the
prefill step left out. ``--fixed`` keeps each method always on (``adaptive: false``), so the cost
of its verification step shows even where the cost model would turn it off.

    python benchmarks/spec_step_cost.py --methods none,ngram,lookahead --fixed
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPT = '''def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
'''


def measure(method: str, tokens: int, fixed: bool, repeats: int) -> list[str]:
    from soarllm import LLM, SamplingParams, hub

    kw = {} if method == "none" else {"speculative_config": {"method": method,
                                                             "adaptive": not fixed}}
    llm = LLM(str(hub.pull("smollm2-135m-instruct")), enable_prefix_caching=False, **kw)
    eng = llm.llm_engine
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8))  # warm
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    lines = []
    for rep in range(repeats):
        eng.add_request(f"r{rep}", PROMPT, sp)
        eng.step()  # the prefill
        steps, spent, done = 0, 0.0, 0
        while eng.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = eng.step()
            spent += time.perf_counter() - t0
            steps += 1
            done = max([len(o.outputs[0].token_ids) for o in outs if o.finished] + [done])
        lines.append(f"{method}{' (fixed)' if fixed and method != 'none' else ''}: {done} tokens, "
                     f"{steps} steps, {spent / steps * 1e3:.2f} ms/step, "
                     f"{done / steps:.2f} tokens/step, {done / spent:.1f} tok/s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="none,ngram,lookahead")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--fixed", action="store_true", help="adaptive: false for every method")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for method in args.methods.split(","):
        for line in measure(method, args.tokens, args.fixed, args.repeats):
            print(line, flush=True)


if __name__ == "__main__":
    main()
