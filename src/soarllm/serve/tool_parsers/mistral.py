"""Mistral: ``[TOOL_CALLS]`` (a special token) and a JSON array of calls::

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

The marker is a special token, so requests parsed with this format keep special tokens in the
text (skip_special_tokens=false unless the request sets it) and the other special tokens (the end
of sequence) are taken out of the content. Call ids are 9 letters and digits, as Mistral's
templates require of the ids sent back with tool results.
"""

from __future__ import annotations

import json
import secrets
import string

from soarllm.serve.tool_parsers.base import FunctionSpec, ToolCallFormat, ToolParser, lark_literal

_MARKER = "[TOOL_CALLS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    format = ToolCallFormat(start=_MARKER, end="]", open="[", separator=",",
                            args_keys=("arguments",))
    needs_special_tokens = True

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return _MARKER in template

    def new_call_id(self) -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def call_rule(self, function: FunctionSpec, args_rule: str) -> str:
        head = '{"name": ' + json.dumps(function.name) + ', "arguments": '
        return f"{lark_literal(head)} {args_rule} {lark_literal('}')}"

    def block_grammar(self, call: str, parallel: bool) -> str:
        more = f' (", " {call})*' if parallel else ""
        return f'start: {self.marker(_MARKER)} "[" {call}{more} "]"'
