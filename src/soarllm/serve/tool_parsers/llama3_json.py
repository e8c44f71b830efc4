"""Llama 3.1 / 3.2 JSON tool calls: the reply is the call itself, a JSON object
``{"name": ..., "parameters": {...}}`` (after ``<|python_tag|>`` when the detokenizer keeps
special tokens); several calls are separated by ``;``. A reply that does not start with ``{`` is
plain content."""

from __future__ import annotations

import json

from soarllm.serve.tool_parsers.base import FunctionSpec, ToolCallFormat, ToolParser, lark_literal


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    format = ToolCallFormat(start="<|python_tag|>", end=None, separator=";",
                            args_keys=("parameters", "arguments"), bare_json_at_start=True)

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return "<|python_tag|>" in template or "ipython" in template

    def call_rule(self, function: FunctionSpec, args_rule: str) -> str:
        head = '{"name": ' + json.dumps(function.name) + ', "parameters": '
        return f"{lark_literal(head)} {args_rule} {lark_literal('}')}"

    def block_grammar(self, call: str, parallel: bool) -> str:
        """Without the python tag: a reply that starts with "{" is a call either way."""
        return f"start: {call}" + (f' ("; " {call})*' if parallel else "")
