"""soarllm on one GPU against the memory-bandwidth roofline and transformers, Llama-3-8B shapes.

Random weights at real shapes (``load_format="dummy"``: no weight file travels to the GPU machine),
bfloat16, greedy, ``ignore_eos``. What it prints and writes (JSON + a markdown table):

- ``copy_bw``: device-to-device copy bandwidth, bytes read + written per second (best of 20).
- ``roofline``: for a decode step at batch B and context C, the bytes a step must move (every
  weight the step reads once: the decoder layers, final norm and LM head, not the embedding table,
  plus the KV cache attended: 2 x layers x KV heads x head size x 2 bytes x C per sequence) over
  the measured copy bandwidth. ``fraction`` = roofline time / measured time.
- ``step``: our decode step alone (the captured CUDA graph replayed, CUDA events, best of 50), at
  batch 1 and 64, context 256: the kernels' share of the roofline without the engine around them.
- ``e2e``: the offline API, 128 prompt + 128 generated tokens per sequence, batch 1 and 64: decode
  tok/s = B x 127 / (T(128 tokens) - T(1 token)), as llama-batched-bench defines S_TG.
- ``hf``: transformers' ``generate`` with ``cache_implementation="static"`` on the same shapes and
  random weights (its automatic torch.compile is switched off: ``disable_compile=True``; compiling
  an 8B model would take minutes of the lent machine), the same formula. ``speedup`` = ours / theirs.
- ``w4a16``: the same engine with ``quantization="w4a16"`` (group 128, Triton kernels as chosen
  by ``quant_gemm.w4_config``, or the ``SOARLLM_W4A16_TUNING`` table), batch 1 and 64, against bf16.
- ``prefill``: one 2048-token prompt, time to first token; MFU = (2 x parameters x tokens + causal
  attention FLOPs) / time / the chip's dense bf16 peak (989 TFLOP/s for H100/H200 SXM) and / the
  measured 8192^3 bf16 matmul rate.

    python benchmarks/gpu_roofline.py --out benchmarks/results/gpu_roofline

Sections that fail print their error and the rest go on. vLLM is not compared: it cannot be
installed on the lent machine (no network, its wheel is over the 64 MiB that travels).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
    intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
    vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
    hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16",
    bos_token_id=1, eos_token_id=2,
)
PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16 tensor-core peak (datasheet)

RESULTS: dict = {}


def log(key: str, value) -> None:
    RESULTS[key] = value
    print(json.dumps({key: value}), flush=True)


def section(name):
    def wrap(fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            except Exception as e:  # report and go on: one broken section must not hide the rest
                traceback.print_exc()
                log(f"{name}_error", f"{type(e).__name__}: {e}"[:2000])
            finally:
                print(f"[{name}] {time.perf_counter() - t0:.1f}s", flush=True)
        return run
    return wrap


def model_dir(layers: int) -> Path:
    """A Llama-3-8B config (``layers`` deep) with a small trained tokenizer (ids past its vocab
    decode to nothing, which suits random weights)."""
    from tests.tiny import train_tokenizer

    d = Path(tempfile.mkdtemp(prefix="llama3-8b-shape-"))
    cfg = dict(LLAMA3_8B, num_hidden_layers=layers)
    (d / "config.json").write_text(json.dumps(cfg))
    train_tokenizer(d)
    return d


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn, iters: int, warmup: int = 3) -> float:
    """Best time of one call in seconds, CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return best


@section("env")
def env():
    p = torch.cuda.get_device_properties(0)
    import triton

    log("env", {"gpu": p.name, "sms": p.multi_processor_count, "mem_gib": round(p.total_memory / 2**30),
                "torch": torch.__version__, "triton": triton.__version__,
                "w4a16_tuning": os.environ.get("SOARLLM_W4A16_TUNING", "built-in")})


@section("copy_bw")
def copy_bw() -> float:
    n = 2**30  # 2 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a), 20)
    bw = 2 * a.numel() * 2 / t
    log("copy_bw_GBps", round(bw / 1e9))
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    tm = cuda_time(lambda: x @ x, 10)
    log("matmul_8192_TFLOPs", round(2 * 8192**3 / tm / 1e12))
    return bw  # the buffers go with the frame


def step_bytes(cfg: dict, batch: int, context: int, weight_bytes: float) -> float:
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 128 * 2 * context * batch
    return weight_bytes + kv


def weight_bytes(cfg: dict, bytes_per_weight: float = 2.0) -> float:
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kvd = cfg["num_key_value_heads"] * 128
    per_layer = h * (h + 2 * kvd) + h * h + 3 * h * i
    head = cfg["vocab_size"] * h
    return (per_layer * layers) * bytes_per_weight + head * 2 + (2 * layers + 1) * h * 2


def make_llm(path: Path, **kw):
    from soarllm import LLM

    return LLM(str(path), load_format="dummy", dtype="bfloat16", max_model_len=4096,
               enable_prefix_caching=False, **kw)


def e2e_decode(llm, batch: int, prompt_len: int = 128, gen: int = 128, repeats: int = 2) -> float:
    from soarllm import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(100, 500, (prompt_len,), generator=g).tolist() for _ in range(batch)]

    def timed(n: int) -> float:
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, sp)
        return time.perf_counter() - t0

    timed(4)  # warm
    best = float("inf")
    for _ in range(repeats):
        t1, tn = timed(1), timed(gen)
        best = min(best, tn - t1)
    return batch * (gen - 1) / best


def graph_step_time(llm, batch: int, context: int) -> float | None:
    """One captured decode step at ``batch`` rows of ``context`` tokens (block tables point at
    distinct blocks; contents are whatever the cache holds)."""
    runner = llm.llm_engine.executor.runner
    graphs = runner.graphs
    if graphs is None:
        return None
    from soarllm.kernels.attention import AttentionMetadata

    bs = runner.block_size
    nb = -(-context // bs)
    dev = runner.device
    tables = torch.arange(batch * nb, device=dev).view(batch, nb) % (runner.kv_caches[0].shape[1] - 1) + 1
    pos = torch.full((batch,), context - 1, device=dev)
    meta = AttentionMetadata(
        positions=pos, query_start_loc=torch.arange(batch + 1, device=dev),
        seq_lens=torch.full((batch,), context, device=dev), slot_mapping=tables[:, -1] * bs,
        block_tables=tables, logits_indices=torch.arange(batch, device=dev), num_decodes=batch,
        query_lens_cpu=[1] * batch, query_start_loc_cpu=list(range(batch + 1)),
        seq_lens_cpu=[context] * batch)
    ids = torch.zeros(batch, dtype=torch.long, device=dev)
    with torch.inference_mode():
        return cuda_time(lambda: graphs.run(ids, meta), 50)


@section("ours")
def ours(path: Path, bw: float, cfg: dict, prefix: str, quantization: str | None = None,
         batches: tuple[int, ...] = (1, 64), gen: int = 128, prefill_len: int = 2048):
    kw = {"quantization": quantization} if quantization else {}
    t0 = time.perf_counter()
    llm = make_llm(path, kv_cache_memory="16GiB", max_num_seqs=64, **kw)
    log(f"{prefix}_start_s", round(time.perf_counter() - t0, 1))
    runner = llm.llm_engine.executor.runner
    log(f"{prefix}_backend", f"{runner.backend.name}, graphs={runner.graphs is not None}")
    bpw = 2.0 if quantization is None else 0.5 + 2 * 2 / 128  # int4 + bf16 scale/zero per group
    wb = weight_bytes(cfg, bpw)
    for b in batches:
        st = graph_step_time(llm, b, 256)
        if st is not None:
            roof = step_bytes(cfg, b, 256, wb) / bw
            log(f"{prefix}_step_b{b}_ms", round(st * 1e3, 3))
            log(f"{prefix}_step_b{b}_roofline_fraction", round(roof / st, 3))
        tps = e2e_decode(llm, b, gen=gen)
        log(f"{prefix}_e2e_decode_b{b}_tok_s", round(tps, 1))
        roof = step_bytes(cfg, b, 192, wb) / bw  # mean context of 128 + 128
        log(f"{prefix}_e2e_decode_b{b}_roofline_fraction", round(roof / (b / tps), 3))
    if quantization is None:
        prefill(llm, cfg, prefill_len)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prefill(llm, cfg: dict, n: int = 2048):
    from soarllm import SamplingParams

    prompt = torch.randint(100, 500, (n,)).tolist()
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], sp)
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        llm.generate([prompt], sp)
        best = min(best, time.perf_counter() - t0)
    params = weight_bytes(cfg, 1.0)
    flops = 2 * params * n + 2 * cfg["num_hidden_layers"] * 4096 * n * n  # QK^T + PV, causal half
    log(f"prefill_{n}_tok_s", round(n / best))
    log(f"prefill_{n}_mfu_vs_datasheet", round(flops / best / PEAK_BF16, 3))
    mm = RESULTS.get("matmul_8192_TFLOPs")
    if mm:
        log(f"prefill_{n}_mfu_vs_measured_matmul", round(flops / best / (mm * 1e12), 3))


@section("hf")
def hf(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in cfg.items()
                            if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    for b in (1, 64):
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(100, 500, (b, 128), generator=g).cuda()
        _hf_generate(model, ids, 4)
        best = min(_hf_generate(model, ids, 128) - _hf_generate(model, ids, 1) for _ in range(2))
        log(f"hf_static_decode_b{b}_tok_s", round(b * 127 / best, 1))


def _hf_generate(model, ids, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, cache_implementation="static", disable_compile=True,
                   pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: hf,ours,w4a16")
    ap.add_argument("--smoke", action="store_true",
                    help="a CPU check of the script itself: tiny batches and lengths, no GPU parts")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    cfg = dict(LLAMA3_8B, num_hidden_layers=args.layers)
    kw = {}
    if args.smoke:  # runs anywhere, measures nothing meaningful
        kw = dict(batches=(1, 2), gen=4, prefill_len=16)
        bw = 1e11
    else:
        env()
        bw = copy_bw() or 3.0e12
    path = model_dir(args.layers)
    if "hf" not in skip:
        hf(cfg)
        gc.collect()
        torch.cuda.empty_cache()
    if "ours" not in skip:
        ours(path, bw, cfg, "bf16", **kw)
    if "w4a16" not in skip:
        ours(path, bw, cfg, "w4a16", quantization="w4a16-g128", **kw)
    for b in (1, 64):
        a, h = RESULTS.get(f"bf16_e2e_decode_b{b}_tok_s"), RESULTS.get(f"hf_static_decode_b{b}_tok_s")
        if a and h:
            log(f"speedup_vs_hf_b{b}", round(a / h, 2))
    for b in (1, 64):
        a, q = RESULTS.get(f"bf16_e2e_decode_b{b}_tok_s"), RESULTS.get(f"w4a16_e2e_decode_b{b}_tok_s")
        if a and q:
            log(f"w4a16_over_bf16_b{b}", round(q / a, 2))
    a, q = RESULTS.get("bf16_step_b1_ms"), RESULTS.get("w4a16_step_b1_ms")
    if a and q:
        log("w4a16_over_bf16_step_b1", round(a / q, 2))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(RESULTS, indent=1))
        lines = ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in RESULTS.items()]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
