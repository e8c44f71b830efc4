"""Where the CPU W4A16 / W8A16 paths should switch from PyTorch's int4 / int8 kernels to
dequantize + bfloat16 GEMM.

For the default model's projection shapes (SmolLM2-135M: hidden 576, MLP 1536, 9 + 2 x 3 heads of
64) and a range of row counts, times per layer set (qkv, o, gate_up, down):
  int4      aten._weight_int4pack_mm_for_cpu on the packed weight (what batch-1 decode uses)
  unpack    the native unpacker (kernels/csrc/int4pack.c) + F.linear in bfloat16
  bf16      F.linear on a resident bfloat16 weight (the ceiling: no unpacking, 4x the memory)
With --scheme w8a16 instead:
  int8      aten._weight_int8pack_mm (per-channel int8, what W8A16 decode uses)
  deq8      the weight dequantized to bfloat16 (quant/w8a16.dequantize_w8_bf16) + F.linear
interleaved, best of --repeats, on this machine's threads. Prints ms per decoder layer and the
dequantize / kernel ratio; `DEQUANT_MIN_ROWS` in quant/w4a16.py and quant/w8a16.py is where
dequantizing starts to win.

    python benchmarks/cpu_int4_prefill.py [--scheme w4a16|w8a16] [--rows 1,8,...,512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from soarllm.quant import w4a16, w8a16

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def _time(fn, repeats: int, inner: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        fn()
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,16,32,64,128,256,512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the table here")
    ap.add_argument("--scheme", choices=("w4a16", "w8a16"), default="w4a16")
    args = ap.parse_args()
    if args.scheme == "w8a16":
        return main_w8a16(args)
    fn = w4a16._unpacker()
    if fn is None:
        raise SystemExit("the native unpacker is not available here")
    torch.manual_seed(0)
    layers = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.05
        q, s, z = w4a16.quantize_w4(w, 32)
        packed, sz = w4a16.int4pack_cpu(q, s, z)
        layers[name] = (packed, sz, w.to(torch.bfloat16), k)
    rows_list = [int(r) for r in args.rows.split(",")]
    table = []
    print(f"threads {torch.get_num_threads()}; ms per decoder layer (4 projections)")
    print(f"{'rows':>5} {'int4':>8} {'unpack':>8} {'bf16':>8} {'unpack/int4':>12}")
    for m in rows_list:
        xs = {name: torch.randn(m, k).to(torch.bfloat16) for name, (_, _, _, k) in layers.items()}

        def int4(xs=xs):
            for name, (packed, sz, _, _) in layers.items():
                torch.ops.aten._weight_int4pack_mm_for_cpu(xs[name], packed, 32, sz)

        def unpack(xs=xs):
            for name, (packed, sz, _, k) in layers.items():
                F.linear(xs[name], w4a16._unpack(fn, packed, sz, 32, k))

        def bf16(xs=xs):
            for name, (_, _, wb, _) in layers.items():
                F.linear(xs[name], wb)

        inner = max(2, 256 // m)
        times = {"int4": [], "unpack": [], "bf16": []}
        for _ in range(2):  # interleave the three, twice, so drift hits them alike
            for label, f in (("int4", int4), ("unpack", unpack), ("bf16", bf16)):
                times[label].append(_time(f, args.repeats, inner))
        best = {k: min(v) * 1e3 for k, v in times.items()}
        table.append({"rows": m, **best})
        print(f"{m:>5} {best['int4']:>8.3f} {best['unpack']:>8.3f} {best['bf16']:>8.3f} "
              f"{best['unpack'] / best['int4']:>11.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "shapes": SHAPES, "ms_per_layer": table},
                      f, indent=1)



def main_w8a16(args) -> None:
    torch.manual_seed(0)
    layers = {}
    for name, (n, k) in SHAPES.items():
        q, scale = w8a16.quantize_w8(torch.randn(n, k) * 0.05)
        layers[name] = (q, scale.to(torch.bfloat16), k)
    table = []
    print(f"threads {torch.get_num_threads()}; ms per decoder layer (4 projections), W8A16")
    print(f"{'rows':>5} {'int8':>8} {'deq8':>8} {'deq8/int8':>10}")
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {name: torch.randn(m, k).to(torch.bfloat16) for name, (_, _, k) in layers.items()}

        def int8(xs=xs):
            for name, (q, scale, _) in layers.items():
                torch.ops.aten._weight_int8pack_mm(xs[name], q, scale)

        def deq8(xs=xs):
            for name, (q, scale, _) in layers.items():
                F.linear(xs[name], w8a16.dequantize_w8_bf16(q, scale))

        inner = max(2, 256 // m)
        times = {"int8": [], "deq8": []}
        for _ in range(2):
            for label, f in (("int8", int8), ("deq8", deq8)):
                times[label].append(_time(f, args.repeats, inner))
        best = {k: min(v) * 1e3 for k, v in times.items()}
        table.append({"rows": m, **best})
        print(f"{m:>5} {best['int8']:>8.3f} {best['deq8']:>8.3f} {best['deq8'] / best['int8']:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "shapes": SHAPES, "scheme": "w8a16",
                       "ms_per_layer": table}, f, indent=1)


if __name__ == "__main__":
    main()
