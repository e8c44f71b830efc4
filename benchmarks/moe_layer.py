"""Fused MoE layer vs loops over the experts on this CPU, and MoE decode vs a dense model of the
same active size.

1. The experts of one Mixtral-like layer (8 experts, top-2, hidden 1024, intermediate 2048,
   float32) at 1 / 32 / 256 tokens, three ways on the same routing:
   - fused: soarllm's FusedMoE compute (tokens sorted by expert, one grouped matmul per expert
     over only its tokens, index_add_ combine);
   - dense loop: ``per_expert_loop``, every expert over every token, weighted by the router
     (zero where a token was not routed) - what "a loop over the experts" costs without routing;
   - transformers: transformers 5's own MixtralExperts (a Python loop over the experts hit, each
     gathering its tokens with torch.where), the sparse loop the fused layer replaces.
   Each figure is the median of --repeats interleaved runs (ms).
2. End to end (LLM, random weights, greedy, prefix caching off): decode tok/s of a Mixtral-style
   model (8 experts of width I, top-2) and of a Llama with one MLP of width 2I - the same active
   parameters per token - at batch 1 and 16, best of --e2e-repeats.

    python benchmarks/moe_layer.py --out benchmarks/results/moe_layer

The machine's 2 cores are shared: figures move from run to run; the ratios, measured interleaved,
move less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from soarllm.model.layers.fused_moe import (  # noqa: E402
    fused_experts,
    per_expert_loop,
    select_experts,
)


def layer_benchmark(experts: int, top_k: int, hidden: int, inter: int, batches: list[int],
                    repeats: int) -> list[dict]:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                        num_experts_per_tok=top_k)
    hf = MixtralExperts(cfg).eval()
    g = torch.Generator().manual_seed(0)
    hf.gate_up_proj.data.normal_(0, 0.02, generator=g)
    hf.down_proj.data.normal_(0, 0.02, generator=g)
    w13, w2 = hf.gate_up_proj.data, hf.down_proj.data
    router = torch.randn(experts, hidden, generator=g) * 0.02
    rows = []
    for batch in batches:
        x = torch.randn(batch, hidden, generator=g)
        weights, ids = select_experts(x @ router.t(), top_k, renormalize=True)
        ways = {
            "fused": partial(fused_experts, x, w13, w2, weights, ids),
            "dense_loop": partial(per_expert_loop, x, w13, w2, weights, ids),
            "transformers": partial(hf, x, ids, weights),
        }
        with torch.inference_mode():
            ref = ways["transformers"]()
            for fn in ways.values():  # warm, and the same answer
                torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4)
            times = {name: [] for name in ways}
            for _ in range(repeats):
                for name, fn in ways.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        row = {"batch": batch, **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
               "speedup_vs_dense_loop": round(ms["dense_loop"] / ms["fused"], 2),
               "speedup_vs_transformers": round(ms["transformers"] / ms["fused"], 2),
               "experts_hit": int(ids.unique().numel())}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def model_dir(root: Path, name: str, cfg: dict) -> Path:
    from tests.tiny import train_tokenizer

    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    train_tokenizer(d)
    return d


def decode_tok_s(path: Path, batch: int, gen: int, repeats: int) -> float:
    from soarllm import LLM, SamplingParams

    llm = LLM(str(path), load_format="dummy", dtype="float32", enable_prefix_caching=False,
              max_num_seqs=max(batch, 1), block_size=16)
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, 500, (32,), generator=g).tolist() for _ in range(batch)]

    def timed(n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - t0

    timed(4)  # warm
    best = float("inf")
    for _ in range(repeats):
        best = min(best, timed(gen) - timed(1))
    return batch * (gen - 1) / best


def e2e_benchmark(hidden: int, inter: int, layers: int, batches: list[int], gen: int,
                  repeats: int) -> list[dict]:
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024,
                  hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
                  eos_token_id=2, bos_token_id=1)
    moe = dict(common, architectures=["MixtralForCausalLM"], model_type="mixtral",
               intermediate_size=inter, num_local_experts=8, num_experts_per_tok=2)
    dense = dict(common, architectures=["LlamaForCausalLM"], model_type="llama",
                 intermediate_size=2 * inter)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"moe": model_dir(Path(tmp), "moe", moe), "dense": model_dir(Path(tmp), "dense", dense)}
        for batch in batches:
            tok_s = {name: decode_tok_s(p, batch, gen, repeats) for name, p in paths.items()}
            row = {"batch": batch, "moe_tok_s": round(tok_s["moe"], 1),
                   "dense_same_active_tok_s": round(tok_s["dense"], 1),
                   "moe_slowdown": round(tok_s["dense"] / tok_s["moe"], 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--e2e-batches", default="1,16")
    ap.add_argument("--e2e-gen", type=int, default=32)
    ap.add_argument("--e2e-repeats", type=int, default=2)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; 1 is steadier on a shared machine)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = dict(experts=8, top_k=2, hidden=1024, inter=2048)
    result = {
        "device": f"cpu, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "layer_shapes": shapes,
        "layer": layer_benchmark(**shapes, batches=[int(b) for b in args.batches.split(",")],
                                 repeats=args.repeats),
    }
    if not args.skip_e2e:
        e2e_shapes = dict(hidden=512, inter=1024, layers=4)
        result["e2e_shapes"] = {**e2e_shapes, "experts": 8, "top_k": 2,
                                "dense_intermediate": 2 * e2e_shapes["inter"]}
        result["e2e"] = e2e_benchmark(**e2e_shapes,
                                      batches=[int(b) for b in args.e2e_batches.split(",")],
                                      gen=args.e2e_gen, repeats=args.e2e_repeats)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"moe_layer_{torch.get_num_threads()}t.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
