"""``soar bench serve`` (any OpenAI-compatible server, side by side) and ``soar bench offline``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _csv_floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


# `soar bench offline` without sizes: a GPU runs vLLM's usual workload; a CPU a far smaller one
# (on 2 cores the GPU sizes take minutes per latency run).
OFFLINE_SIZES = {
    "cuda": {"num_prompts": 64, "input_len": 256, "output_len": 128, "batch_sizes": [1, 8, 32]},
    "cpu": {"num_prompts": 8, "input_len": 64, "output_len": 32, "batch_sizes": [1, 4, 8]},
}


def _add_workload_args(p: argparse.ArgumentParser, seed: bool = True,
                       sized_by_device: bool = False) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="random", choices=["random", "code", "chat", "jsonl"],
                   help="prompt source: random tokens, code files, multi-turn chat, or a jsonl "
                   "file")
    g.add_argument("--dataset-path", default=None, help="the jsonl workload's file")
    if sized_by_device:
        gpu, cpu = OFFLINE_SIZES["cuda"], OFFLINE_SIZES["cpu"]
        g.add_argument("--num-prompts", type=int, default=None,
                       help=f"prompts of the throughput run (default: {gpu['num_prompts']} on a "
                       f"GPU, {cpu['num_prompts']} on CPU)")
        g.add_argument("--input-len", type=int, default=None,
                       help=f"prompt tokens (random, code) (default: {gpu['input_len']} on a GPU, "
                       f"{cpu['input_len']} on CPU)")
        g.add_argument("--output-len", type=int, default=None,
                       help=f"max_tokens of each request (default: {gpu['output_len']} on a GPU, "
                       f"{cpu['output_len']} on CPU)")
    else:
        g.add_argument("--num-prompts", type=int, default=64, help="requests sent per load point")
        g.add_argument("--input-len", type=int, default=256, help="prompt tokens (random, code)")
        g.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="draw lengths uniformly from [L*(1-r), L*(1+r)]")
    g.add_argument("--turns", type=int, default=3, help="user turns per conversation (chat)")
    if seed:  # engine commands already have --seed
        g.add_argument("--seed", type=int, default=0, help="seed of the workload's prompts")


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="measure LACE: latency, capacity, ease")
    sub = bench.add_subparsers(dest="bench_command", metavar="{serve,offline}")
    bench.set_defaults(func=lambda args: bench.print_help() or 2)

    serve = sub.add_parser(
        "serve", help="load-test OpenAI-compatible servers side by side",
        description="Load-test one or more OpenAI-compatible servers with the same workload and "
        "load sweep. Metrics follow vLLM's serving benchmark (stated in the report).",
    )
    serve.add_argument("--endpoint", action="append", required=True, metavar="[LABEL=]URL",
                       help="server root URL, repeat for side by side (e.g. soar=http://...:8000)")
    serve.add_argument("--launch", action="append", default=[], metavar="CMD",
                       help="command that starts the i-th endpoint's server (measures ease); "
                       "'-' leaves an endpoint to an already running server")
    serve.add_argument("--api", default="completions", choices=["completions", "chat"],
                       help="OpenAI API to load: /v1/completions or /v1/chat/completions")
    serve.add_argument("--model", default=None, help="model id to send (default: /v1/models)")
    serve.add_argument("--tokenizer", default=None,
                       help="tokenizer for prompt lengths and token checks "
                       "(registry name, HF dir, .gguf; default: the default model)")
    serve.add_argument("--api-key", default=None, help="bearer token sent to every endpoint")
    serve.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    serve.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                       help="let requests stop at EOS (default: ignore_eos where supported)")
    serve.add_argument("--eos-logit-bias", nargs="?", const="*", default=None, metavar="LABELS",
                       help="also bias the EOS token away, for servers without ignore_eos: "
                            "all endpoints, or only the comma-separated endpoint labels given")
    _add_workload_args(serve)
    g = serve.add_argument_group("load")
    g.add_argument("--concurrency", type=_csv_ints, default=None,
                   help="max requests in flight; a comma list sweeps (e.g. 1,8,32)")
    g.add_argument("--request-rate", action="append", default=None,
                   help="requests/s ('inf' = all at once); a comma list sweeps")
    g.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"],
                   help="inter-arrival distribution at a finite --request-rate")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape (only with --arrival gamma): <1 bursty, >1 regular")
    g.add_argument("--warmup", type=int, default=1, help="untimed requests before the first run")
    g.add_argument("--slo", default=None, help="e.g. ttft=500,tpot=50 (ms): goodput, capacity")
    g.add_argument("--capacity-search", type=int, default=0, metavar="STEPS",
                   help="bisection steps refining capacity between swept rates")
    o = serve.add_argument_group("output")
    o.add_argument("--percentiles", type=_csv_floats, default=(50, 90, 99),
                   help="comma list of latency percentiles to report")
    o.add_argument("--output-dir", type=Path, default=Path("bench_results"),
                   help="where results.json, report.md and the plots go")
    o.add_argument("--save-text", action="store_true", help="keep generated text in the JSON")
    o.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")
    serve.set_defaults(func=_run_serve)

    offline = sub.add_parser(
        "offline", help="engine throughput and latency through LLM, without HTTP",
        description="A throughput run (every prompt at once) and latency runs (batches of "
        "--batch-sizes prompts) through the offline API. Without sizes it picks a workload for "
        "the device: vLLM's usual one on a GPU, a much smaller one on CPU.",
    )
    from soarllm.cli.engine_args import add_engine_args

    add_engine_args(offline)
    _add_workload_args(offline, seed=False, sized_by_device=True)
    gpu, cpu = OFFLINE_SIZES["cuda"]["batch_sizes"], OFFLINE_SIZES["cpu"]["batch_sizes"]
    offline.add_argument("--batch-sizes", type=_csv_ints, default=None,
                         help="latency runs: batches of this many prompts at once (default: "
                         f"{','.join(map(str, gpu))} on a GPU, {','.join(map(str, cpu))} on CPU)")
    offline.add_argument("--repeats", type=int, default=1,
                         help="latency runs per batch size; the fastest is kept")
    offline.add_argument("--output-json", type=Path, default=None,
                         help="also write the results here (input of soar plan --calibrate)")
    offline.add_argument("--no-progress", dest="progress", action="store_false",
                         help="no progress bar on stderr")
    offline.add_argument("--profile", action="store_true",
                         help="print where each step's time goes (schedule, prepare inputs, "
                         "forward, sample, outputs) and write a torch profiler trace")
    offline.add_argument("--profile-trace", type=Path, default=Path("soar-profile-trace.json"),
                         help="where --profile writes the torch profiler trace (Chrome format)")
    offline.set_defaults(func=_run_offline)


def _endpoints(args: argparse.Namespace) -> list:
    from soarllm.bench.client import Endpoint

    endpoints = []
    for spec in args.endpoint:
        label, sep, url = spec.partition("=")
        if not sep or "://" in label:
            label, url = "", spec
        endpoints.append(Endpoint(
            url=url, label=label, api=args.api, model=args.model, api_key=args.api_key,
            temperature=args.temperature, ignore_eos=args.ignore_eos,
        ))
    return endpoints


def _run_serve(args: argparse.Namespace) -> int:
    from soarllm.bench.metrics import SLO
    from soarllm.bench.report import render_markdown
    from soarllm.bench.serving import ServeBenchConfig, parse_rates, run_serve_benchmark
    from soarllm.bench.sweep import load_points
    from soarllm.bench.tokenizer import load_tokenizer
    from soarllm.bench.workloads import WorkloadConfig
    from soarllm.errors import InvalidRequestError

    if len(args.launch) > len(args.endpoint):
        raise InvalidRequestError("give one --endpoint for every --launch (in the same order)")
    if args.arrival == "poisson" and args.burstiness != 1.0:
        raise InvalidRequestError("--burstiness needs --arrival gamma (poisson is burstiness 1)")
    tokenizer_name = args.tokenizer
    if tokenizer_name is None:
        from soarllm.config import DEFAULT_MODEL

        tokenizer_name = DEFAULT_MODEL
    tokenizer = load_tokenizer(tokenizer_name)
    endpoints = _endpoints(args)
    if args.eos_logit_bias:
        only = None if args.eos_logit_bias == "*" else set(args.eos_logit_bias.split(","))
        for ep in endpoints:
            if only is None or ep.label in only:
                ep.eos_token_id = tokenizer.eos_token_id
    concurrencies: list[int | None] = list(args.concurrency) if args.concurrency else [None]
    cfg = ServeBenchConfig(
        endpoints=endpoints,
        workload=WorkloadConfig(
            name=args.workload, num_prompts=args.num_prompts, input_len=args.input_len,
            output_len=args.output_len, range_ratio=args.range_ratio, api=args.api,
            path=args.dataset_path, turns=args.turns, seed=args.seed,
        ),
        loads=load_points(parse_rates(args.request_rate), concurrencies, args.burstiness),
        launches=[None if c in ("", "-") else c for c in args.launch],
        slo=SLO.parse(args.slo),
        warmup=args.warmup,
        seed=args.seed,
        capacity_search_steps=args.capacity_search,
        percentiles=tuple(args.percentiles),
        output_dir=args.output_dir,
        progress=args.progress,
        keep_text=args.save_text,
    )
    doc = run_serve_benchmark(cfg, tokenizer)
    print(render_markdown(doc))
    print(f"wrote results.json, report.md and plots to {args.output_dir}/", file=sys.stderr)
    return 0


def fill_offline_sizes(args: argparse.Namespace, device: str) -> list[str]:
    """Give the sizes the user left out the device's defaults; returns the names filled in."""
    sizes = OFFLINE_SIZES["cuda" if device.startswith("cuda") else "cpu"]
    filled = []
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)
            filled.append(name)
    return filled


def _run_offline(args: argparse.Namespace) -> int:
    from soarllm.bench.offline import run_offline_cli
    from soarllm.cli.engine_args import engine_args_from

    engine_args = engine_args_from(args)
    device = engine_args.resolved_device()
    if fill_offline_sizes(args, device):
        print(f"[soar] {device} workload: {args.num_prompts} prompts x {args.input_len} in / "
              f"{args.output_len} out, batch sizes {','.join(map(str, args.batch_sizes))} "
              "(--num-prompts, --input-len, --output-len, --batch-sizes change it)",
              file=sys.stderr)
    return run_offline_cli(args, engine_args)
