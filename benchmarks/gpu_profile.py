"""Where a GPU decode step's time goes, Llama-3-8B shapes (dummy weights, bf16).

Two views, each at batch 1 and 64 (prompt 16 tokens, 33 generated: 32 decode steps):

- ``kernels``: the eager step under ``torch.profiler`` (CUDA activity), device time per kernel
  name per decode step, top 15 -- what the GPU spends its time on.
- ``host``: the CUDA-graph engine under ``cProfile``, the top 25 Python functions by own time per
  decode step -- what the host does between two replays (the gap between the step time and the
  end-to-end token rate in gpu_roofline.py).

    python benchmarks/gpu_profile.py --layers 32 --out benchmarks/results/gpu/profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from benchmarks.gpu_roofline import make_llm, model_dir, sync  # noqa: E402

STEPS = 32


def prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(100, 500, (16,), generator=g).tolist() for _ in range(batch)]


def kernels(llm, batch: int, out) -> None:
    from torch.profiler import ProfilerActivity, profile

    from soarllm import SamplingParams

    sp = SamplingParams(max_tokens=STEPS + 1, temperature=0.0, ignore_eos=True)
    llm.generate(prompts(batch), sp)  # warm (Triton compiles)
    sync()
    cuda = torch.cuda.is_available()  # on a CPU (a smoke run) the operators' own CPU time
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        llm.generate(prompts(batch), sp)
        sync()
    rows = [(e.key, e.device_time_total if cuda else e.self_cpu_time_total, e.count)
            for e in prof.key_averages()]
    rows = [r for r in rows if r[1] > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"\n## kernels, batch {batch}: {total / STEPS / 1e3:.3f} ms device time per step "
          "(prefill of 16 tokens included, spread over the steps)", file=out)
    for name, t, n in rows[:15]:
        print(f"{t / STEPS / 1e3:8.3f} ms {100 * t / total:5.1f}%  x{n / STEPS:5.1f}  {name[:90]}",
              file=out)


def host(llm, batch: int, out) -> None:
    from soarllm import SamplingParams

    sp = SamplingParams(max_tokens=STEPS + 1, temperature=0.0, ignore_eos=True)
    llm.generate(prompts(batch), sp)
    pr = cProfile.Profile()
    pr.enable()
    llm.generate(prompts(batch), sp)
    sync()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    print(f"\n## host, batch {batch}: {st.total_tt / STEPS * 1e3:.3f} ms per step "
          "(cProfile inflates Python time)", file=out)
    st.sort_stats("tottime").print_stats(25)
    print("\n".join(s.getvalue().splitlines()[6:40]), file=out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=None, help="also write <out>.txt")
    ap.add_argument("--quantization", default=None, help="e.g. w4a16-g128")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--no-host", action="store_true", help="kernels only")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    kw = {"quantization": a.quantization} if a.quantization else {}
    d = model_dir(a.layers)
    buf = io.StringIO()

    class Tee:
        def write(self, s):
            sys.stdout.write(s)
            buf.write(s)

    tee = Tee()
    eager = make_llm(d, enforce_eager=True, max_num_seqs=64, kv_cache_memory="16GiB", **kw)
    for b in batches:
        kernels(eager, b, tee)
    del eager
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not a.no_host:
        graphs = make_llm(d, max_num_seqs=64, kv_cache_memory="16GiB", **kw)
        for b in batches:
            host(graphs, b, tee)
    if a.out:
        Path(a.out + ".txt").write_text(buf.getvalue())


if __name__ == "__main__":
    main()
