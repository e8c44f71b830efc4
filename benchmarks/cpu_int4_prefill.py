"""Where the CPU W4A16 / W8A16 paths should switch kernels, by row count.

For the default model's projection shapes (SmolLM2-135M: hidden 576, MLP 1536, 9 + 2 x 3 heads of
64), --layers copies of each (30: the model's weights streamed from memory, as in a real step, not
one layer's sitting in cache), times of one pass through all of them (qkv, o, gate_up, down):
  int4      aten._weight_int4pack_mm_for_cpu on the packed weight (where the native GEMM does not fit)
  native    soarllm's GEMM over the same packed weight (kernels/csrc/int4pack.c), at every row
            count in quant/w4a16.py where a layer fits it
  unpack    the native unpacker (kernels/csrc/int4pack.c) + F.linear in bfloat16
  bf16      F.linear on a resident bfloat16 weight (4x the memory)
  vnni      int8 activations x the 4-bit weight on AVX-512 VNNI or AVX2 (quant/vnni.py, GGUF's default),
            through its op as the model calls it
With --head instead: the default model's tied Q8_0 LM head (49152 x 576): the VNNI kernel on its
int8 bytes, the two int4 planes over [x, x] (native GEMM), and the dequantized bfloat16 table.
With --scheme w8a16 instead:
  int8      aten._weight_int8pack_mm (per-channel int8, what W8A16 decode uses)
  deq8      the weight dequantized to bfloat16 (quant/w8a16.dequantize_w8_bf16) + F.linear
interleaved, best of --repeats, on this machine's threads. Prints ms per pass (W4A16) or per
decoder layer (W8A16) and the ratios to the int4 / int8 kernel; `DEQUANT_MIN_ROWS` in
quant/w4a16.py and quant/w8a16.py is where the switch to unpacking pays.

    python benchmarks/cpu_int4_prefill.py [--scheme w4a16|w8a16] [--rows 1,8,...,512] [--repeats 5]
    python benchmarks/cpu_int4_prefill.py --head [--rows 1,8,12,16,32,64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from soarllm.quant import vnni, w4a16, w8a16

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
    ap.add_argument("--head", action="store_true", help="the Q8_0 LM head's three paths")
    args = ap.parse_args()
    if args.scheme == "w8a16":
        return main_w8a16(args)
    if args.head:
        return main_head(args)
    fn = w4a16._unpacker()
    gemm = w4a16._int4pack_gemm()
    if fn is None:
        raise SystemExit("the native int4 unpacker is not available here")
    use_vnni = vnni.kernels() is not None
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        copy = {}
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k) * 0.05
            q, s, z = w4a16.quantize_w4(w, 32)
            packed, sz = w4a16.int4pack_cpu(q, s, z)
            p8 = vnni.pack_vnni4(q, s, z - 8 * s) if use_vnni else None
            copy[name] = (packed, sz, w.to(torch.bfloat16), k, p8, n)
        layers.append(copy)
    rows_list = [int(r) for r in args.rows.split(",")]
    table = []
    # the native GEMM needs AVX-512 BF16; without it the ratios are to PyTorch's int4 kernel
    base = "native" if gemm is not None else "int4"
    labels = (("int4", "native") if gemm is not None else ("int4",)) + ("unpack", "bf16") + (
        ("vnni",) if use_vnni else ())
    print(f"threads {torch.get_num_threads()}; ms per pass over {args.layers} layers of projections")
    print(f"{'rows':>5} " + " ".join(f"{x:>8}" for x in labels) + f"  int4/{base} unpack/{base}"
          + (f"  {base}/vnni" if use_vnni else ""))
    for m in rows_list:
        xs = {name: torch.randn(m, c[3]).to(torch.bfloat16) for name, c in layers[0].items()}

        def int4(xs=xs):
            for copy in layers:
                for name, (packed, sz, *_) in copy.items():
                    torch.ops.aten._weight_int4pack_mm_for_cpu(xs[name], packed, 32, sz)

        def native(xs=xs):
            for copy in layers:
                for name, (packed, sz, *_) in copy.items():
                    w4a16._gemm(gemm, xs[name], packed, sz, 32)

        def unpack(xs=xs):
            for copy in layers:
                for name, (packed, sz, _, k, *_) in copy.items():
                    F.linear(xs[name], w4a16._unpack(fn, packed, sz, 32, k))

        def bf16(xs=xs):
            for copy in layers:
                for name, (_, _, wb, *_) in copy.items():
                    F.linear(xs[name], wb)

        def vnni4(xs=xs):
            for copy in layers:
                for name, (*_, (p8, sm), n) in copy.items():
                    vnni.linear(xs[name], p8, sm, n)

        fns = {"int4": int4, "native": native, "unpack": unpack, "bf16": bf16, "vnni": vnni4}
        times = {label: [] for label in labels}
        for _ in range(2):  # interleave them, twice, so drift hits them alike
            for label in labels:
                times[label].append(_time(fns[label], args.repeats, 1))
        best = {k: min(v) * 1e3 for k, v in times.items()}
        table.append({"rows": m, **best})
        print(f"{m:>5} " + " ".join(f"{best[x]:>8.2f}" for x in labels)
              + f"  {best['int4'] / best[base]:>10.2f}x {best['unpack'] / best[base]:>10.2f}x"
              + (f"  {best[base] / best['vnni']:>10.2f}x" if use_vnni else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "shapes": SHAPES, "layers": args.layers,
                       "ms_per_pass": table}, f, indent=1)


def main_head(args) -> None:
    """The tied Q8_0 head of the default model (random bytes at its shape), ms per call."""
    if vnni.kernels() is None or w4a16._int4pack_gemm() is None:
        raise SystemExit("the VNNI and native int4 kernels are not both available here")
    n, k = 49152, 576
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g)
    d = torch.rand(n, k // 32, generator=g) * 0.01
    p8, sm8 = vnni.pack_vnni8(u, d, -128 * d)
    table = ((u.float() - 128) * d.repeat_interleave(32, 1)).to(torch.bfloat16)
    q = u.to(torch.int16) - 128  # quant/gguf.py's two planes: q = 16 h + l
    h = torch.div(q, 16, rounding_mode="floor")
    planes, sz = w4a16.int4pack_cpu(torch.cat([h + 8, q - 16 * h], 1).to(torch.uint8),
                                    torch.cat([16 * d, d], 1),
                                    torch.cat([torch.zeros_like(d), 8 * d], 1))
    gemm = w4a16._int4pack_gemm()
    labels = ("vnni8", "planes", "table")
    print(f"threads {torch.get_num_threads()}; ms per call of the {n} x {k} head")
    print(f"{'rows':>5} " + " ".join(f"{x:>8}" for x in labels))
    rows = []
    for m in (int(r) for r in args.rows.split(",")):
        x = torch.randn(m, k).to(torch.bfloat16)
        fns = (lambda x=x: vnni.linear(x, p8, sm8, n),
               lambda x=x: w4a16._gemm(gemm, torch.cat([x, x], -1), planes, sz, 32),
               lambda x=x: F.linear(x, table))
        times = {label: [] for label in labels}
        for _ in range(2):
            for label, f in zip(labels, fns):
                times[label].append(_time(f, args.repeats, 1))
        best = {key: min(v) * 1e3 for key, v in times.items()}
        rows.append({"rows": m, **best})
        print(f"{m:>5} " + " ".join(f"{best[x]:>8.2f}" for x in labels), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "head": [n, k], "ms_per_call": rows},
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
