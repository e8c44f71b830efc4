"""Where the CPU W4A16 / W8A16 paths should switch kernels, by row count.

For the default model's projection shapes (SmolLM2-135M: hidden 576, MLP 1536, 9 + 2 x 3 heads of
64), --layers copies of each (30: the model's weights streamed from memory, as in a real step, not
one layer's sitting in cache), times of one pass through all of them (qkv, o, gate_up, down):
  int4      aten._weight_int4pack_mm_for_cpu on the packed weight (where the native GEMM does not fit)
  native    soarllm's GEMM over the same packed weight (kernels/csrc/int4pack.c), at every row
            count in quant/w4a16.py where a layer fits it
  unpack    the native unpacker (kernels/csrc/int4pack.c) + F.linear in bfloat16
  bf16      F.linear on a resident bfloat16 weight (4x the memory)
With --scheme w8a16 instead:
  int8      aten._weight_int8pack_mm (per-channel int8, what W8A16 decode uses)
  deq8      the weight dequantized to bfloat16 (quant/w8a16.dequantize_w8_bf16) + F.linear
interleaved, best of --repeats, on this machine's threads. Prints ms per pass (W4A16) or per
decoder layer (W8A16) and the ratios to the int4 / int8 kernel; `DEQUANT_MIN_ROWS` in
quant/w4a16.py and quant/w8a16.py is where the switch to unpacking pays.

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
    ap.add_argument("--layers", type=int, default=30, help="W4A16: copies of the layer shapes")
    args = ap.parse_args()
    if args.scheme == "w8a16":
        return main_w8a16(args)
    fn = w4a16._unpacker()
    gemm = w4a16._int4pack_gemm()
    if fn is None or gemm is None:
        raise SystemExit("the native int4 kernels are not available here")
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        copy = {}
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k) * 0.05
            q, s, z = w4a16.quantize_w4(w, 32)
            packed, sz = w4a16.int4pack_cpu(q, s, z)
            copy[name] = (packed, sz, w.to(torch.bfloat16), k)
        layers.append(copy)
    rows_list = [int(r) for r in args.rows.split(",")]
    table = []
    labels = ("int4", "native", "unpack", "bf16")
    print(f"threads {torch.get_num_threads()}; ms per pass over {args.layers} layers of projections")
    print(f"{'rows':>5} " + " ".join(f"{x:>8}" for x in labels) + "  int4/native unpack/native")
    for m in rows_list:
        xs = {name: torch.randn(m, k).to(torch.bfloat16) for name, (_, _, _, k) in layers[0].items()}

        def int4(xs=xs):
            for copy in layers:
                for name, (packed, sz, _, _) in copy.items():
                    torch.ops.aten._weight_int4pack_mm_for_cpu(xs[name], packed, 32, sz)

        def native(xs=xs):
            for copy in layers:
                for name, (packed, sz, _, _) in copy.items():
                    w4a16._gemm(gemm, xs[name], packed, sz, 32)

        def unpack(xs=xs):
            for copy in layers:
                for name, (packed, sz, _, k) in copy.items():
                    F.linear(xs[name], w4a16._unpack(fn, packed, sz, 32, k))

        def bf16(xs=xs):
            for copy in layers:
                for name, (_, _, wb, _) in copy.items():
                    F.linear(xs[name], wb)

        times = {label: [] for label in labels}
        for _ in range(2):  # interleave them, twice, so drift hits them alike
            for label, f in zip(labels, (int4, native, unpack, bf16)):
                times[label].append(_time(f, args.repeats, 1))
        best = {k: min(v) * 1e3 for k, v in times.items()}
        table.append({"rows": m, **best})
        print(f"{m:>5} " + " ".join(f"{best[x]:>8.2f}" for x in labels)
              + f"  {best['int4'] / best['native']:>10.2f}x {best['unpack'] / best['native']:>10.2f}x",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "shapes": SHAPES, "layers": args.layers,
                       "ms_per_pass": table}, f, indent=1)


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
