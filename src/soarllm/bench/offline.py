"""``soar bench offline``: the engine's throughput and latency through ``LLM``, without HTTP.

* throughput: every prompt submitted at once; requests/s, output tokens/s and total tokens/s over
  the wall time of ``LLM.generate``.
* latency: for each batch size B, B prompts submitted together (best of ``--repeats`` runs); per request TTFT (generate start ->
  first token), TPOT ((last token - first token) / (output tokens - 1)) and E2EL (start -> finish),
  from the engine's own request timestamps. These runs are what ``soar plan --calibrate`` fits.

A progress bar on stderr counts the output tokens of the runs done, with an estimate of the time
left (each run is timed whole, so the bar moves once per run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from soarllm.bench.metrics import DEFAULT_PERCENTILES, Distribution
from soarllm.bench.workloads import WorkloadConfig, build_workload

SCHEMA = "soarllm.bench.offline/1"


def _prompt_ids(llm: Any, workload: WorkloadConfig) -> list[tuple[list[int], int]]:
    tokenizer = llm.get_tokenizer()
    requests = build_workload(workload, tokenizer)
    out = []
    for r in requests:
        text = r.prompt if isinstance(r.prompt, str) else r.prompt[-1]["content"]
        ids = tokenizer.encode(text, add_special_tokens=False)
        if workload.name == "random":
            ids = ids[: workload.input_len]
        out.append((ids, r.output_len))
    return out


def _generate(llm: Any, prompts: list[tuple[list[int], int]]) -> tuple[float, list[Any], float]:
    from soarllm import SamplingParams

    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for _, n in prompts]
    start = time.time()
    outputs = llm.generate([ids for ids, _ in prompts], params)
    return start, outputs, time.time() - start


def throughput_run(llm: Any, prompts: list[tuple[list[int], int]]) -> dict[str, Any]:
    _, outputs, duration = _generate(llm, prompts)
    n_in = sum(len(o.prompt_token_ids) for o in outputs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "num_requests": len(outputs), "duration_s": duration,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": len(outputs) / duration,
        "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
    }


def latency_run(llm: Any, prompts: list[tuple[list[int], int]],
                percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict[str, Any]:
    start, outputs, duration = _generate(llm, prompts)
    ttfts, tpots, e2els = [], [], []
    n_in = n_out = 0
    for o in outputs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        n_in += len(o.prompt_token_ids)
        n_out += n
        if m is None or m.first_token_time is None:
            continue
        ttfts.append(m.first_token_time - start)
        e2els.append((m.finished_time or m.last_token_time) - start)
        if n > 1:
            tpots.append((m.last_token_time - m.first_token_time) / (n - 1))
    return {
        "batch_size": len(prompts), "duration_s": duration,
        "mean_input_len": n_in / len(outputs), "mean_output_len": n_out / len(outputs),
        "output_throughput": n_out / duration,
        "ttft_ms": asdict(Distribution.of(ttfts, percentiles)),
        "tpot_ms": asdict(Distribution.of(tpots, percentiles)),
        "e2el_ms": asdict(Distribution.of(e2els, percentiles)),
    }


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the shortest wall time (noise on a shared machine only ever adds time)."""
    best = min(runs, key=lambda r: r["duration_s"])
    return {**best, "repeats": len(runs), "durations_s": [r["duration_s"] for r in runs]}


def _output_tokens(prompts: list[tuple[list[int], int]]) -> int:
    return sum(n for _, n in prompts)


def run_offline(llm: Any, workload: WorkloadConfig, batch_sizes: list[int],
                model: str = "", repeats: int = 1, progress: bool = False) -> dict[str, Any]:
    from tqdm.auto import tqdm

    biggest = max([workload.num_prompts, *batch_sizes])
    prompts = _prompt_ids(llm, WorkloadConfig(**{**asdict(workload), "num_prompts": biggest}))
    repeats = max(1, repeats)
    runs: list[tuple[str, int]] = [("warm-up", 1), ("throughput", workload.num_prompts)]
    runs += [(f"latency batch {b}", b) for b in batch_sizes for _ in range(repeats)]
    total = sum(_output_tokens(prompts[:n]) for _, n in runs)
    bar = tqdm(total=total, unit="tok", desc="bench offline", disable=not progress,
               file=sys.stderr)
    done = iter(runs)

    def step(result: Any) -> Any:
        _, n = next(done)
        bar.update(_output_tokens(prompts[:n]))
        return result

    try:
        bar.set_postfix_str("warm-up")
        step(_generate(llm, prompts[:1]))
        bar.set_postfix_str(f"throughput, {workload.num_prompts} prompts at once")
        throughput = step(throughput_run(llm, prompts[: workload.num_prompts]))
        latency = []
        for b in batch_sizes:
            bar.set_postfix_str(f"latency, batch {b}")
            latency.append(best_of([step(latency_run(llm, prompts[:b])) for _ in range(repeats)]))
    finally:
        bar.close()
    return {
        "schema": SCHEMA, "model": model, "workload": asdict(workload),
        "throughput": throughput, "latency_runs": latency,
    }


def render_offline(doc: dict[str, Any]) -> str:
    t = doc["throughput"]
    w = doc["workload"]
    lines = [
        f"# soar bench offline: {doc['model']}", "",
        f"Workload `{w['name']}`, input {w['input_len']} / output {w['output_len']} tokens.", "",
        f"Throughput ({t['num_requests']} requests at once): {t['request_throughput']:.2f} req/s, "
        f"{t['output_throughput']:.1f} output tok/s, {t['total_token_throughput']:.1f} total tok/s.",
        "", "| batch | TTFT med ms | TTFT p99 ms | TPOT med ms | TPOT p99 ms | E2EL med ms | "
        "out tok/s |", "|---|---|---|---|---|---|---|",
    ]
    for r in doc["latency_runs"]:
        lines.append(
            f"| {r['batch_size']} | {r['ttft_ms']['median']:.1f} | "
            f"{r['ttft_ms']['percentiles'].get('p99', 0):.1f} | {r['tpot_ms']['median']:.2f} | "
            f"{r['tpot_ms']['percentiles'].get('p99', 0):.2f} | {r['e2el_ms']['median']:.1f} | "
            f"{r['output_throughput']:.1f} |"
        )
    spec = doc.get("speculative_decoding")
    if spec:
        per_pos = ", ".join(f"{a:.2f}" for a in spec["acceptance_per_position"])
        lines += ["", f"Speculative decoding: {spec['num_drafts']} verifications, "
                  f"{spec['num_draft_tokens']} draft tokens, {spec['num_accepted_tokens']} accepted "
                  f"({spec['acceptance_rate']:.0%}); mean acceptance length "
                  f"{spec['mean_acceptance_length']:.2f}; acceptance by position: {per_pos}."]
    return "\n".join(lines) + "\n"


def speculation_report(stats: Any) -> dict[str, Any] | None:
    """Speculative decoding counters of a run (None when nothing was drafted)."""
    if not stats.num_drafts:
        return None
    return {
        "num_drafts": stats.num_drafts, "num_draft_tokens": stats.num_draft_tokens,
        "num_accepted_tokens": stats.num_accepted_tokens,
        "acceptance_rate": stats.num_accepted_tokens / max(stats.num_draft_tokens, 1),
        "mean_acceptance_length": stats.mean_acceptance_length,
        "acceptance_per_position": [a / d if d else 0.0 for a, d in
                                    zip(stats.accepted_per_position, stats.drafted_per_position)],
        "by_method": {m: {"drafts": v[0], "draft_tokens": v[1], "accepted": v[2]}
                      for m, v in stats.by_method.items()},
    }


def write_torch_trace(llm: Any, path: Any, num_prompts: int = 4, output_len: int = 16) -> Any:
    """Run a short batch under torch.profiler and write its Chrome trace to ``path``."""
    import torch

    from soarllm import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    prompts = [[1 + (i * 7 + j) % 100 for j in range(32)] for i in range(num_prompts)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=False) as prof:
        llm.generate(prompts, params)
    prof.export_chrome_trace(str(path))
    return path


def run_offline_cli(args: argparse.Namespace, engine_args: Any) -> int:
    """`soar bench offline` once its arguments are complete (`engine_args`: EngineArgs)."""
    from soarllm import LLM

    engine = asdict(engine_args)
    model = engine.pop("model")
    llm = LLM(model=model, **engine)
    workload = WorkloadConfig(
        name=args.workload, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio, path=args.dataset_path,
        turns=args.turns, seed=args.seed,
    )
    phases = None
    if getattr(args, "profile", False):
        from soarllm.profiling import StepPhases

        phases = llm.llm_engine.phases = StepPhases()
    doc = run_offline(llm, workload, args.batch_sizes, model=model, repeats=args.repeats,
                      progress=getattr(args, "progress", True))
    spec = speculation_report(llm.llm_engine.speculator.stats)
    if spec is not None:
        doc["speculative_decoding"] = spec
    print(render_offline(doc))
    if phases is not None:
        llm.llm_engine.phases = None
        doc["step_phases"] = phases.report()
        print(phases.render())
        trace = write_torch_trace(llm, args.profile_trace)
        print(f"wrote a torch profiler trace of a short batch to {trace} "
              "(open it in chrome://tracing or Perfetto)", file=sys.stderr)
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.output_json}", file=sys.stderr)
    return 0
