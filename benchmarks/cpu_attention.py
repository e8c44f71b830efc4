"""Decode attention on CPU: the reference backend (gather + PyTorch ops) against the native kernel.

One layer's attention call (KV write included) for batches of one-token decodes over a shuffled
paged cache, at the default model's head shape (9 query heads, 3 KV heads, head size 64, blocks of
16), in bfloat16 and float32, interleaved, best of --repeats; and the two outputs' largest
difference. Run it on a quiet machine:

    python benchmarks/cpu_attention.py [--batches 1,8,32] [--contexts 200,1000] [--repeats 5]
        [--layers 30]   # one cache per layer, cycled: read from memory as in a real step
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from soarllm.kernels.attention import AttentionMetadata, ReferenceAttentionBackend
from soarllm.kernels.cpu_attention import CpuAttentionBackend

HQ, HKV, D, BS = 9, 3, 64, 16


def _batch(b: int, ctx: int, dtype: torch.dtype, g: torch.Generator):
    blocks_per = (ctx + BS - 1) // BS
    num_blocks = b * blocks_per + 8
    cache = torch.randn(2, num_blocks, BS, HKV, D, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: b * blocks_per].view(b, blocks_per)
    lens = torch.randint(max(1, ctx // 2), ctx + 1, (b,), generator=g)
    slots = tables[torch.arange(b), (lens - 1) // BS] * BS + (lens - 1) % BS

    def meta():  # a fresh one per step, as the runner builds it
        return AttentionMetadata(
            positions=lens - 1, query_start_loc=torch.arange(b + 1), seq_lens=lens,
            slot_mapping=slots, block_tables=tables, logits_indices=torch.arange(b),
            num_decodes=b, query_lens_cpu=[1] * b, query_start_loc_cpu=list(range(b + 1)),
            seq_lens_cpu=lens.tolist())

    q = torch.randn(b, HQ, D, generator=g).to(dtype)
    k = torch.randn(b, HKV, D, generator=g).to(dtype)
    v = torch.randn(b, HKV, D, generator=g).to(dtype)
    return cache, meta, q, k, v


def _time(backend, args, repeats: int, caches: list[torch.Tensor], inner: int = 200) -> float:
    """Best per-call time; the calls cycle over ``caches`` (one per layer, the same blocks), so
    that with as many as a model has layers the cache is read from memory, not the CPU's
    caches, as in a real step."""
    _cache, meta, q, k, v = args
    best = float("inf")
    for _ in range(repeats):
        m = meta()
        backend.forward(q, k, v, caches[0], m, D**-0.5)
        t = time.perf_counter()
        for i in range(inner):  # layers of one step: the per-step plan is reused
            backend.forward(q, k, v, caches[i % len(caches)], m, D**-0.5)
        best = min(best, (time.perf_counter() - t) / inner)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="200,1000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=1,
                    help="KV caches cycled over (30: the default model's layers, read from memory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ref, cpu = ReferenceAttentionBackend(), CpuAttentionBackend()
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"threads {torch.get_num_threads()}; us per layer call (decode rows, context up to N)")
    print(f"{'dtype':>9} {'batch':>5} {'ctx':>5} {'reference':>10} {'cpu':>8} {'speed-up':>8} "
          f"{'max diff':>9}")
    for dtype in (torch.bfloat16, torch.float32):
        for ctx in (int(c) for c in args.contexts.split(",")):
            for b in (int(x) for x in args.batches.split(",")):
                batch = _batch(b, ctx, dtype, g)
                cache, meta, q, k, v = batch
                diff = (ref.forward(q, k, v, cache, meta(), D**-0.5).float()
                        - cpu.forward(q, k, v, cache, meta(), D**-0.5).float()).abs().max().item()
                caches = [cache] + [cache.clone() for _ in range(args.layers - 1)]
                t_ref, t_cpu = [], []
                for _ in range(2):
                    t_ref.append(_time(ref, batch, args.repeats, caches))
                    t_cpu.append(_time(cpu, batch, args.repeats, caches))
                r, c = min(t_ref), min(t_cpu)
                name = str(dtype).removeprefix("torch.")
                rows.append({"dtype": name, "batch": b, "context": ctx, "reference_us": r,
                             "cpu_us": c, "max_diff": diff})
                print(f"{name:>9} {b:>5} {ctx:>5} {r:>10.1f} {c:>8.1f} {r / c:>7.1f}x "
                      f"{diff:>9.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "layers": args.layers, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
