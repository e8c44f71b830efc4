"""The argument parser every `soar` command uses.

* ``--help`` shows each flag's default.
* A subcommand reports its own errors: an unknown flag prints *that* subcommand's usage (plain
  argparse hands unknown flags up to the top-level parser, which prints ``soar``'s usage), with a
  hint for vLLM's flag names and for near misses.
* Checks that need the whole command line (the model given twice, two flags that set the same
  thing) run right after parsing, as ``post_parse`` hooks of the parser that owns the flags, so
  their errors print that parser's usage too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from soarllm.hub import DEFAULT_MODEL

PostParse = Callable[["SoarParser", argparse.Namespace, list[str]], list[str]]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to a flag's help, except where the default says nothing (None, off
    switches) or the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default:" in text or "%(default)" in text or default is None
            or default is argparse.SUPPRESS or default == [] or isinstance(default, bool)
            and not isinstance(action, argparse.BooleanOptionalAction)
        ):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text


class SoarParser(argparse.ArgumentParser):
    def __init__(self, *args, root: bool = False, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.root = root
        self.post_parse: list[PostParse] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        for hook in self.post_parse:
            extras = hook(self, namespace, extras)
        if extras and not self.root:
            from soarllm.cli.flag_hints import unknown_flags_message

            self.error(unknown_flags_message(self, extras))
        return namespace, extras


def add_model_argument(parser: SoarParser, *, required_after: str | None = None,
                       help: str | None = None) -> None:
    """The model, positional (``soar serve MODEL``) or as ``--model``/``-m``; giving both with
    different values is an error. After parsing, ``args.model`` holds it (the default model when
    neither is given).

    `required_after` names a required positional that follows the model (``soar generate [MODEL]
    PROMPT``): argparse fills that one first, so ``soar generate MODEL --max-tokens 8 PROMPT``
    would leave PROMPT over; the hook then shifts the values into place.
    """
    what = help or "registry name, Hugging Face directory, .gguf file or hub id"
    parser.add_argument("model", nargs="?", default=None,
                        help=f"{what} (default: {DEFAULT_MODEL}; see `soar pull --list`)")
    parser.add_argument("--model", "-m", dest="model_flag", default=None, metavar="MODEL",
                        help="the model, as a flag (vLLM's spelling); same as the positional")

    def resolve(p: SoarParser, ns: argparse.Namespace, extras: list[str]) -> list[str]:
        flag = ns.__dict__.pop("model_flag", None)
        if (required_after and flag is None and ns.model is None and extras
                and not extras[0].startswith("-")):
            # `MODEL --flag V PROMPT`: argparse gave MODEL to the later positional; PROMPT is over.
            ns.model = getattr(ns, required_after)
            setattr(ns, required_after, extras[0])
            extras = extras[1:]
        if flag is not None and ns.model is not None and flag != ns.model:
            p.error(f"the model is given twice, as {ns.model!r} and as --model {flag!r}; give it "
                    "once (positional or --model)")
        ns.model = ns.model or flag or DEFAULT_MODEL
        return extras

    parser.post_parse.append(resolve)
