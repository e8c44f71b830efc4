"""`soar chat`: an interactive, streaming chat in the terminal."""

from __future__ import annotations

import sys

from soarllm.cli.engine_args import add_engine_args, engine_args_from
from soarllm.cli.generate import add_sampling_args, sampling_params_from, stream


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming)")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=run, max_tokens=512)


def run(args) -> int:
    from soarllm.chat_utils import render_chat
    from soarllm.engine.llm_engine import LLMEngine
    from soarllm.errors import SoarError

    engine = LLMEngine.from_engine_args(engine_args_from(args))
    params = sampling_params_from(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("soar chat: type a message; an empty line or Ctrl-D quits.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.encode(render_chat(engine.tokenizer, messages), add_special_tokens=False)
        try:
            text, _, _ = stream(engine, f"turn-{turn}", prompt, params)
        except SoarError as e:
            print(f"\n[error] {e.message}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": text})
        turn += 1
    return 0
