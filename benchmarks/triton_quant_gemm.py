"""Weight-only quantized GEMV/GEMM (Triton, kernels/triton/quant_gemm.py) against bfloat16 F.linear
(cuBLAS) on Llama-3-8B layer shapes, on a CUDA GPU.

Each measurement replays a CUDA graph of 20 calls (the decode path runs under graphs, so launch
overhead is left out) cycling through enough copies of the weight to exceed the L2 cache, and
reports microseconds per call, the weight bytes read per second and the speedup over bfloat16.
``--sweep`` also times a few GEMV launch configurations at M = 1. ``--dot-sweep`` times the
tensor-core kernel (``w4_dot``) against the GEMV and dequantize + GEMM per batch bucket at group 128,
summed over the four shapes (one decoder layer's GEMMs), and writes the winners as a
``SOARLLM_W4A16_TUNING`` table (``--tuning-out``). ``--tinygemm`` adds PyTorch's
own int4 kernel (``aten._weight_int4pack_mm``, the one gpt-fast and torchao use on CUDA) at group
128 as a peer, after checking that it computes the same product as ours.

    python benchmarks/triton_quant_gemm.py --out results/triton_quant_gemm.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 6144), (4096, 28672), (14336, 4096), (4096, 4096)]  # (K, N): qkv, gate_up, down, o
L2_BYTES = 256 << 20  # rotate weights through more than any current L2


def _time_us(fns) -> float:
    """Mean microseconds per call of the callables, replayed from one CUDA graph."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    calls = [fns[i % len(fns)] for i in range(max(20, len(fns)))]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for f in calls:  # warm the graph pool
            f()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * len(calls))


def _copies(nbytes: int) -> int:
    return max(2, -(-L2_BYTES // max(nbytes, 1)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ms", default="1,4,16,64")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--tinygemm", action="store_true")
    p.add_argument("--dot-sweep", action="store_true")
    p.add_argument("--tuning-out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    from soarllm.kernels.triton import quant_gemm as qg
    from soarllm.quant.w4a16 import quantize_w4
    from soarllm.quant.w8a16 import quantize_w8

    dev = "cuda"
    rows = []
    name = torch.cuda.get_device_name()
    if args.dot_sweep:
        rows, table = _dot_sweep(qg, quantize_w4, tuning_out=args.tuning_out)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps({"device": name, "rows": rows,
                                                                  "tuning": table}, indent=1))
        return 0
    for k, n in SHAPES:
        w = torch.randn(n, k, device=dev) * 0.02
        dense = w.bfloat16()
        q8, s8 = quantize_w8(w)
        w8 = (qg.pack_w8(q8), s8.float())
        w4 = {}
        for g in (32, 128):
            q, s, z = quantize_w4(w, g)
            w4[g] = qg.pack_w4(q, s, z, g, torch.bfloat16)
            if args.tinygemm and g == 128:
                tiny = _tinygemm_layout(q, s, z)
        del w, q8, s8
        byte_counts = {
            "bf16": dense.numel() * 2,
            "w8a16": w8[0].numel() + w8[1].numel() * 4,
            **{f"w4a16-g{g}": sum(t.numel() * t.element_size() for t in w4[g]) for g in w4},
        }
        if args.tinygemm:
            byte_counts["tinygemm-g128"] = sum(t.numel() * t.element_size() for t in tiny)
            xc = torch.randn(3, k, device=dev).bfloat16()
            ours = qg.w4a16_gemm(xc, *w4[128], 128).float()
            theirs = torch.ops.aten._weight_int4pack_mm(xc, tiny[0], 128, tiny[1]).float()
            err = ((ours - theirs).norm() / ours.norm()).item()
            print(json.dumps({"K": k, "N": n, "tinygemm_rel_err_vs_ours": round(err, 5)}), flush=True)
        sets = {
            "bf16": [dense] + [dense.clone() for _ in range(_copies(byte_counts["bf16"]) - 1)],
            "w8a16": [w8] + [tuple(t.clone() for t in w8) for _ in range(_copies(byte_counts["w8a16"]) - 1)],
        }
        if args.tinygemm:
            sets["tinygemm-g128"] = [tiny] + [tuple(t.clone() for t in tiny)
                                              for _ in range(_copies(byte_counts["tinygemm-g128"]) - 1)]
        for g in w4:
            key = f"w4a16-g{g}"
            sets[key] = [w4[g]] + [tuple(t.clone() for t in w4[g]) for _ in range(_copies(byte_counts[key]) - 1)]
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device=dev).bfloat16()
            fns = {
                "bf16": [lambda d=d, x=x: F.linear(x, d) for d in sets["bf16"]],
                "w8a16": [lambda t=t, x=x: qg.w8a16_gemm(x, *t) for t in sets["w8a16"]],
            }
            for g in w4:
                fns[f"w4a16-g{g}"] = [lambda t=t, g=g, x=x: qg.w4a16_gemm(x, *t, g) for t in sets[f"w4a16-g{g}"]]
            if args.tinygemm:
                fns["tinygemm-g128"] = [
                    lambda t=t, x=x: torch.ops.aten._weight_int4pack_mm(x, t[0], 128, t[1])
                    for t in sets["tinygemm-g128"]]
            base = None
            for scheme, fs in fns.items():
                us = _time_us(fs)
                base = us if scheme == "bf16" else base
                row = {"K": k, "N": n, "M": m, "scheme": scheme, "us": round(us, 2),
                       "weight_GBps": round(byte_counts[scheme] / us / 1e3, 1),
                       "speedup_vs_bf16": round(base / us, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.sweep and (k, n) != (4096, 4096):
            rows += _sweep(qg, k, n, sets, byte_counts)
        del sets, dense, w4, w8
        torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    return 0


def _tinygemm_layout(q, s, z, inner_k_tiles=8):
    """PyTorch's CUDA int4 layout of q [N, K] in [0, 16) with per-group scales / zeros [N, K/g]:
    two nibbles per byte (even input high), repacked by aten._convert_weight_to_int4pack, and
    scales-and-zeros [K/g, N, 2] in bfloat16; it computes w = (q - 8) * scale + zero, as ours."""
    q8 = ((q[:, ::2].to(torch.int32) << 4) | q[:, 1::2].to(torch.int32)).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(q8.contiguous(), inner_k_tiles)
    sz = torch.stack([s.float(), z.float()], dim=2).transpose(0, 1).contiguous().bfloat16()
    return packed, sz


def _dot_candidates(m: int) -> list[dict]:
    """Kernel choices timed for a batch bucket (w4_dot keyword arguments for "dot")."""
    if m == 1:
        out = [{"kernel": "gemv"}]
        for bn, w in ((128, 2), (256, 2), (128, 4), (256, 4), (64, 2)):
            for per_sm in (2, 4, 8, 16):
                for fused in (False, True):
                    out.append(dict(kernel="dot", block_n=bn, num_warps=w, num_stages=3,
                                    per_sm=per_sm, fused_reduce=fused))
        out += [dict(kernel="dot", block_n=bn, num_warps=2, num_stages=3, per_sm=4,
                     fused_reduce=True, xsum_dot=False) for bn in (128, 256)]
        return out
    out = []
    if m <= 16:
        for bn, w in ((64, 4), (128, 4), (128, 2), (256, 4)):
            for per_sm in (1, 2, 4):
                for fused in (False, True):
                    out.append(dict(kernel="dot", block_m=16, block_n=bn, num_warps=w,
                                    num_stages=3, per_sm=per_sm, fused_reduce=fused))
        out += [dict(kernel="dot", block_m=16, block_n=bn, num_warps=4, num_stages=3, per_sm=2,
                     fused_reduce=True, xsum_dot=False) for bn in (128, 256)]
    elif m <= 64:
        for bm, bn, w in ((16, 128, 4), (32, 128, 4), (32, 64, 4), (32, 256, 4), (64, 128, 4),
                          (64, 256, 8), (16, 256, 4)):
            for per_sm in (1, 2):
                for xs in (True, False):
                    out.append(dict(kernel="dot", block_m=bm, block_n=bn, num_warps=w,
                                    num_stages=3, per_sm=per_sm, fused_reduce=True, xsum_dot=xs))
        out.append({"kernel": "dequant"})
    else:
        out += [{"kernel": "dequant"},
                dict(kernel="dot", block_m=64, block_n=128, num_warps=4, num_stages=3, per_sm=1),
                dict(kernel="dot", block_m=128, block_n=128, num_warps=8, num_stages=3,
                     per_sm=1)]
    return out


def _dot_sweep(qg, quantize_w4, buckets=((1, 1), (64, 64), (16, 16), (256, 1 << 30)), dev="cuda",
               tuning_out: Path | None = None):
    """Per batch bucket (timed at M, table key), every candidate's time summed over the four
    shapes at group 128; first checks each PTX variant against a float64 product."""
    rows, table = [], {}
    weights = {}
    for k, n in SHAPES:
        w = torch.randn(n, k, device=dev) * 0.02
        q, s, z = quantize_w4(w, 128)
        packed = qg.pack_w4(q, s, z, 128, torch.bfloat16)
        nbytes = sum(t.numel() * t.element_size() for t in packed)
        dense = w.bfloat16()
        weights[(k, n)] = (dense, [packed] + [tuple(t.clone() for t in packed)
                                             for _ in range(_copies(nbytes) - 1)],
                           [dense] + [dense.clone() for _ in range(_copies(dense.numel() * 2) - 1)])
        ref_w = qg.unpack_w4(*packed, 128, k).double()
        for m in (1, 5, 16, 64):
            x = torch.randn(m, k, device=dev).bfloat16()
            want = x.double() @ ref_w.t()
            for v in ({"kernel": "dot"}, {"kernel": "dot", "fused_reduce": True},
                      {"kernel": "dequant"}):
                y = torch.empty(m, n, device=dev, dtype=x.dtype)
                if v["kernel"] == "dot":
                    y = qg.w4_dot(x, *packed, 128, y, block_m=16 if m <= 16 else 64, per_sm=8,
                                  fused_reduce=v.get("fused_reduce", False)).double()
                else:
                    y = qg.w4_dequant_mm(x, *packed, 128, y).double()
                err = ((y - want).abs().max() / want.abs().max()).item()
                row = {"check": True, "K": k, "N": n, "M": m, **v, "max_rel_err": round(err, 5)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if err > 2e-2:
                    raise SystemExit(f"w4_dot {v} is wrong at {k}x{n}, M={m}: {err}")
        del w, q, s, z
    for m, key in buckets:
        results = []
        base = 0.0
        for k, n in SHAPES:
            dense_sets = weights[(k, n)][2]
            x = torch.randn(m, k, device=dev).bfloat16()
            base += _time_us([lambda d=d, x=x: F.linear(x, d) for d in dense_sets])
        for cand in _dot_candidates(m):
            total, per = 0.0, {}
            params = {k2: v for k2, v in cand.items() if k2 != "kernel"}
            for k, n in SHAPES:
                sets = weights[(k, n)][1]
                x = torch.randn(m, k, device=dev).bfloat16()
                y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                if cand["kernel"] == "gemv":
                    fs = [lambda t=t, x=x, y=y: qg.w4_gemv(x, *t, 128, y) for t in sets]
                elif cand["kernel"] == "dequant":
                    fs = [lambda t=t, x=x, y=y: qg.w4_dequant_mm(x, *t, 128, y) for t in sets]
                else:
                    fs = [lambda t=t, x=x, y=y, kw=params: qg.w4_dot(x, *t, 128, y, **kw)
                          for t in sets]
                us = _time_us(fs)
                per[f"{k}x{n}"] = round(us, 2)
                total += us
            row = {"M": m, **cand, "layer_us": round(total, 2), "bf16_layer_us": round(base, 2),
                   "speedup_vs_bf16": round(base / total, 3), "per_shape_us": per}
            rows.append(row)
            results.append((total, cand))
            print(json.dumps(row), flush=True)
        best = min(results, key=lambda r: r[0])
        table[str(key)] = best[1]
        if tuning_out:  # written after each bucket: a run cut short keeps what it measured
            tuning_out.parent.mkdir(parents=True, exist_ok=True)
            full = {str(b): qg.W4_TUNING.get(b, {"kernel": "dequant"}) for _, b in buckets}
            tuning_out.write_text(json.dumps({**full, **table}, indent=1))
        print(json.dumps({"bucket": key, "M": m, "best": best[1], "layer_us": round(best[0], 2),
                          "bf16_layer_us": round(base, 2),
                          "speedup_vs_bf16": round(base / best[0], 3)}), flush=True)
    return rows, table


def _sweep(qg, k, n, sets, byte_counts):
    """GEMV launch configurations at M = 1: BLOCK_N, num_warps, programs per SM and packed tiles
    loaded per loop step (unroll)."""
    out = []
    x = torch.randn(1, k, device="cuda").bfloat16()
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    configs = [(bn, w, per_sm, 1) for bn in (64, 128, 256) for w in (1, 2, 4) for per_sm in (4, 8, 16)]
    for bn, w, per_sm, u in configs:
        kw = dict(block_n=bn, num_warps=w, per_sm=per_sm, unroll=u)
        for key in ("w4a16-g128",):
            fs = [lambda t=t, kw=kw: qg.w4_gemv(x, *t, 128, y, **kw) for t in sets[key]]
            us = _time_us(fs)
            row = {"sweep": True, "K": k, "N": n, "scheme": key, **kw, "us": round(us, 2),
                   "weight_GBps": round(byte_counts[key] / us / 1e3, 1)}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
