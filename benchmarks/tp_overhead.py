"""Tensor-parallel overhead on CPU: decode ms/step at TP=1 and TP=2, batch 1 and 32.

On a 2-core machine TP=2 cannot be faster (two ranks of one thread each against one process of
two threads); what can be measured is what the split costs. Three engines on the same random
Llama (hidden 576, 8 heads over 4 KV heads, MLP 1536, 12 layers by default):

- ``uni``: one process, the model in the engine process (today's default);
- ``mp-tp1``: one worker process: the cost of the executor's pipes and pickling alone;
- ``mp-tp2``: two worker processes, gloo all-reduces (2 per layer + embedding) and the logits
  all-gather.

The engines' steps are interleaved (one step of each in turn), so the machine's other load hits
them alike. For each: the median ms per decode step over ``--steps`` steps after warm-up, and for the mp
engines the time rank 0 spent inside collectives (``comm``) and its share of the step, plus the
pickled step message's size. Figures on a shared 2-core machine are noisy: compare the rows of one
run, not runs.

    python benchmarks/tp_overhead.py --out benchmarks/results/tp_overhead
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SOARLLM_ENFORCE_EAGER", "1")  # compiling would dominate a short run
# OpenMP threads that spin after each parallel region would steal the cores from the engine whose
# step comes next: let idle threads sleep (workers inherit the environment)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def make_model(out: Path, layers: int) -> Path:
    from tests.tiny import make_tiny_model

    if not (out / "config.json").exists():
        make_tiny_model(out, "llama", hidden_size=576, num_attention_heads=8,
                        num_key_value_heads=4, intermediate_size=1536, num_hidden_layers=layers)
    return out


def start_engine(model_dir: Path, mode: str):
    from soarllm.config import EngineArgs
    from soarllm.engine.llm_engine import LLMEngine

    tp = 2 if mode == "mp-tp2" else 1
    backend = "uni" if mode == "uni" else "mp"
    return LLMEngine(EngineArgs(model=str(model_dir), dtype="float32", kv_cache_memory="256MiB",
                                tensor_parallel_size=tp, distributed_executor_backend=backend,
                                enable_prefix_caching=False))


def measure(engines: dict, batch: int, steps: int) -> list[dict]:
    """Steps of every engine interleaved, so the machine's other load hits them alike."""
    from soarllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    sizes: dict[str, list[int]] = {m: [] for m in engines}
    times: dict[str, list[float]] = {m: [] for m in engines}
    for mode, engine in engines.items():
        for i in range(batch):
            engine.add_request(f"{batch}-{i}", [(7 * i + j) % 500 + 3 for j in range(32)], params)
        for _ in range(4):  # prefill and a few decodes
            engine.step()
        rpc = getattr(engine.executor, "collective_rpc", None)
        if rpc:
            rpc("comm_stats", True)
            original = engine.executor._broadcast

            def spy(payload, original=original, sizes=sizes[mode]):
                sizes.append(len(payload))
                return original(payload)

            engine.executor._broadcast = spy
    for _ in range(steps):
        for mode, engine in engines.items():
            t0 = time.perf_counter()
            engine.step()
            times[mode].append(time.perf_counter() - t0)
    rows = []
    for mode, engine in engines.items():
        rpc = getattr(engine.executor, "collective_rpc", None)
        if rpc:
            del engine.executor._broadcast
        comm_s, comm_calls = rpc("comm_stats", True)[0] if rpc else (0.0, 0)
        row = {"mode": mode, "tp": 2 if mode == "mp-tp2" else 1, "batch": batch,
               "ms_per_step": round(1e3 * statistics.median(times[mode]), 3),
               "comm_ms_per_step": round(1e3 * comm_s / steps, 3),
               "comm_share": round(comm_s / sum(times[mode]), 3),
               "collectives_per_step": comm_calls / steps,
               "step_message_bytes": int(statistics.median(sizes[mode])) if sizes[mode] else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
        engine.abort_request([f"{batch}-{i}" for i in range(batch)])
        while engine.has_unfinished_requests():
            engine.step()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--modes", default="uni,mp-tp1,mp-tp2")
    ap.add_argument("--out", type=Path, default=None, help="folder for tp_overhead.json")
    a = ap.parse_args()
    model_dir = make_model(Path(tempfile.gettempdir()) / f"soar-tp-bench-{a.layers}", a.layers)
    batches = [int(b) for b in a.batches.split(",")]
    engines = {mode: start_engine(model_dir, mode) for mode in a.modes.split(",")}
    rows = []
    try:
        for batch in batches:
            rows += measure(engines, batch, a.steps)
    finally:
        for engine in engines.values():
            engine.shutdown()
    result = {"model": f"random llama h576 8q/4kv heads mlp1536 x{a.layers} layers, float32",
              "cpu_count": os.cpu_count(), "steps": a.steps, "rows": rows,
              "note": "shared 2-core machine: noisy; uni runs 2 threads in one process, "
                      "mp-tp2 one thread per rank"}
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "tp_overhead.json").write_text(json.dumps(result, indent=2))
    print(f"{'mode':<8} {'batch':>5} {'ms/step':>9} {'comm ms':>8} {'comm %':>7} {'msg B':>7}")
    for r in rows:
        print(f"{r['mode']:<8} {r['batch']:>5} {r['ms_per_step']:>9.2f} "
              f"{r['comm_ms_per_step']:>8.2f} {100 * r['comm_share']:>6.1f}% "
              f"{r['step_message_bytes'] or '-':>7}")


if __name__ == "__main__":
    main()
