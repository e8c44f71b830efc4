"""The `soar` command. Each subcommand lives in its own module under soarllm/cli/ and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the parsed args.
Heavy imports (torch, the engine) happen inside those callables so `soar --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from soarllm.cli.parser import SoarParser

# (module under soarllm.cli, in help order). A module that is missing is skipped.
_SUBCOMMANDS = ["pull", "generate", "chat", "serve", "bench", "eval", "quantize", "compare", "plan"]


def build_parser() -> argparse.ArgumentParser:
    parser = SoarParser(
        prog="soar", description="soarllm: from checkpoint to endpoint, measured by LACE",
        epilog="`soar COMMAND --help` shows a command's arguments and their defaults.", root=True,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=SoarParser)
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"soarllm.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"soarllm.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from soarllm.errors import SoarError

    try:
        return int(args.func(args) or 0)
    except SoarError as e:
        print(f"soar {args.command}: error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
