"""Hermes / Qwen 2.5: each call is a JSON object between ``<tool_call>`` and ``</tool_call>``,
one block per call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json

from soarllm.serve.tool_parsers.base import FunctionSpec, ToolCallFormat, ToolParser, lark_literal


class HermesToolParser(ToolParser):
    name = "hermes"
    format = ToolCallFormat(start="<tool_call>", end="</tool_call>",
                            args_keys=("arguments", "parameters"))

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return "<tool_call>" in template

    def call_rule(self, function: FunctionSpec, args_rule: str) -> str:
        head = '\n{"name": ' + json.dumps(function.name) + ', "arguments": '
        return (f"{self.marker('<tool_call>')} {lark_literal(head)} {args_rule} "
                f"{lark_literal(chr(125) + chr(10))} {self.marker('</tool_call>')}")
