"""`soar chat [MODEL]`: an interactive, streaming chat in the terminal.

Ctrl-C stops the reply being written (the partial reply is kept in the conversation); Ctrl-C at
the prompt, Ctrl-D or an empty line ends the session. A base model (not instruction-tuned) or a
model without a chat template is refused with a message, unless --chat-template gives one.
"""

from __future__ import annotations

import signal
import sys

from soarllm.cli.engine_args import add_engine_args, engine_args_from
from soarllm.cli.generate import (
    add_chat_template_arg,
    add_sampling_args,
    sampling_params_from,
    stream,
)


def register(sub) -> None:
    p = sub.add_parser(
        "chat", help="chat with a model in the terminal (streaming)",
        description="Chat with an instruction-tuned model. Ctrl-C stops the current reply; "
        "Ctrl-C at the prompt, Ctrl-D or an empty line quits.",
    )
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_chat_template_arg(p)
    p.set_defaults(func=run, max_tokens=512)


def chat_template_for(args) -> str | None:
    """The --chat-template text, if given; refuses a registry base model without one (before
    loading it)."""
    from soarllm import hub
    from soarllm.chat_utils import load_chat_template
    from soarllm.errors import ConfigError

    if args.chat_template is not None:
        return load_chat_template(args.chat_template)
    entry = hub.registry_entry_for(args.model)
    if entry is not None and not entry.instruct:
        raise ConfigError(
            f"{entry.name} is a base model: it continues text and was not trained to follow chat "
            f"turns, so chatting with it gives nonsense. Complete text with `soar generate "
            f"{entry.name} \"...\"`, chat with an instruct model (see `soar pull --list`), or "
            f"pass --chat-template to chat with it anyway"
        )
    return None


def use_chat_template(tokenizer, template: str | None, model: str) -> None:
    """Install `template` on the tokenizer, or check that the model has its own."""
    from soarllm.errors import ConfigError

    if template is not None:
        tokenizer.chat_template = template
    elif getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"{model} has no chat template, so chat turns cannot be formatted for it; pass "
            f"--chat-template FILE, or complete plain text with `soar generate`"
        )


class _ReplyInterrupt:
    """SIGINT while a reply is written: the first stops the reply, a second one quits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _ReplyInterrupt:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def __call__(self) -> bool:
        return self.requested


def run(args) -> int:
    from soarllm.chat_utils import render_chat
    from soarllm.engine.llm_engine import LLMEngine
    from soarllm.errors import SoarError

    template = chat_template_for(args)
    engine = LLMEngine.from_engine_args(engine_args_from(args))
    use_chat_template(engine.tokenizer, template, args.model)
    params = sampling_params_from(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("soar chat: type a message; Ctrl-C stops a reply; Ctrl-C at the prompt, Ctrl-D or an "
          "empty line quits.", file=sys.stderr)
    # Ctrl-C must reach this interactive session even when it was started from a shell that
    # ignores SIGINT for background jobs (Python then keeps SIG_IGN instead of its own handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt = _ReplyInterrupt()
    turn = 0
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.encode(render_chat(engine.tokenizer, messages), add_special_tokens=False)
        try:
            with interrupt:
                text, _, _ = stream(engine, f"turn-{turn}", prompt, params, stop=interrupt)
        except SoarError as e:
            print(f"\n[error] {e.message}", file=sys.stderr)
            messages.pop()
            continue
        turn += 1
        print()
        if interrupt.requested:
            print("[reply stopped]", file=sys.stderr)
        messages.append({"role": "assistant", "content": text})
    return 0
