"""`soar generate [MODEL] "prompt"`: one completion, streamed to the terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from soarllm.cli.engine_args import add_engine_args, engine_args_from
from soarllm.cli.parser import add_model_argument


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="complete a prompt with a model (streams to stdout)",
        description="Complete PROMPT with MODEL and stream the text to stdout. The model comes "
        "first when given: soar generate MODEL PROMPT (or soar generate PROMPT --model MODEL).",
    )
    add_model_argument(p, required_after="prompt")
    p.add_argument("prompt", help="the prompt text (quote it)")
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template (instruct models)")
    add_chat_template_arg(p)
    p.add_argument("--stats", action="store_true", help="print timing figures to stderr")
    add_engine_args(p, model=False)
    p.set_defaults(func=run)


def add_chat_template_arg(p) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_JINJA",
                   help="chat template to use instead of the model's: a .jinja file or the "
                   "template text (vLLM's flag)")


def add_sampling_args(p) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min-p x the likeliest's probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens seen before by this (1 = off)")
    g.add_argument("--sample-seed", dest="sampling_seed", type=int, default=None,
                   help="seed of this request's sampling (reproducible output)")
    g.add_argument("--stop", action="append", default=[],
                   help="stop at this text (repeat the flag for several)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past the end-of-sequence token, up to --max-tokens")


def sampling_params_from(args):
    from soarllm.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )


def stream(engine, request_id: str, prompt, params, out=sys.stdout,
           stop: Callable[[], bool] | None = None) -> tuple[str, float | None, int]:
    """Run one request to the end, writing text as it comes; returns (text, first-token time, n).

    `stop` is asked between engine steps: once it answers True the request is aborted and the
    text so far returned."""
    engine.add_request(request_id, prompt, params)
    first, text, n = None, "", 0
    while engine.has_unfinished_requests():
        if stop is not None and stop():
            engine.abort_request(request_id)
            break
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
    from soarllm.cli.chat import chat_template_for, use_chat_template
    from soarllm.engine.llm_engine import LLMEngine

    start = time.time()
    ea = engine_args_from(args)
    use_chat = args.chat or args.chat_template is not None
    template = chat_template_for(args) if use_chat else None
    engine = LLMEngine.from_engine_args(ea)
    loaded = time.time()
    prompt = args.prompt
    if use_chat:
        use_chat_template(engine.tokenizer, template, args.model)
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
