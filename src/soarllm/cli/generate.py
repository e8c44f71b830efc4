"""`soar generate "prompt"`: one completion, streamed to the terminal."""

from __future__ import annotations

import sys
import time

from soarllm.cli.engine_args import add_engine_args, engine_args_from


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a model (streams to stdout)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", "-m", default=None, help="model (default: smollm2-135m-instruct)")
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--stats", action="store_true", help="print timing figures to stderr")
    add_engine_args(p, model_positional=False)
    p.set_defaults(func=run)


def add_sampling_args(p) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sample-seed", dest="sampling_seed", type=int, default=None,
                   help="seed of this request's sampling (reproducible output)")
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params_from(args):
    from soarllm.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )


def stream(engine, request_id: str, prompt, params, out=sys.stdout) -> tuple[str, float | None, int]:
    """Run one request to the end, writing text as it comes; returns (text, first-token time, n)."""
    engine.add_request(request_id, prompt, params)
    first, text, n = None, "", 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            c = o.outputs[0]
            if first is None and c.token_ids:
                first = time.time()
            out.write(c.delta_text)
            out.flush()
            text, n = c.text, len(c.token_ids)
    return text, first, n


def run(args) -> int:
    from soarllm.chat_utils import render_chat
    from soarllm.engine.llm_engine import LLMEngine

    start = time.time()
    ea = engine_args_from(args)
    if args.model:
        ea.model = args.model
    engine = LLMEngine.from_engine_args(ea)
    loaded = time.time()
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.encode(
            render_chat(engine.tokenizer, [{"role": "user", "content": prompt}]),
            add_special_tokens=False,
        )
    _, first, n = stream(engine, "0", prompt, sampling_params_from(args))
    end = time.time()
    sys.stdout.write("\n")
    if args.stats:
        from soarllm.cli._startup import process_start_time

        t0 = process_start_time() or start
        print(
            f"[soar] load {loaded - t0:.2f}s, first token {((first or end) - t0):.2f}s after process "
            f"start, {n} tokens, decode {(n - 1) / max(end - (first or end), 1e-9):.1f} tok/s",
            file=sys.stderr,
        )
    return 0
