"""Tool-call parsers: the model's tool-call syntax -> OpenAI ``tool_calls``, whole or streamed.

One module per format, named as vLLM's ``--tool-call-parser``: ``hermes`` (Hermes / Qwen
``<tool_call>`` JSON), ``llama3_json`` (Llama 3 JSON), ``mistral`` (``[TOOL_CALLS]``). The
server picks one from the chat template (``detect_tool_parser``) unless ``soar serve
--tool-call-parser`` names it. ``request.py`` checks a request's tools and tool_choice and, for a
forced call, builds the grammar that makes the call valid.
"""

from __future__ import annotations

from typing import Any

from soarllm.errors import ConfigError
from soarllm.serve.tool_parsers.base import (
    ExtractedToolCalls,
    FunctionSpec,
    ToolCall,
    ToolCallDelta,
    ToolParser,
)
from soarllm.serve.tool_parsers.hermes import HermesToolParser
from soarllm.serve.tool_parsers.llama3_json import Llama3JsonToolParser
from soarllm.serve.tool_parsers.mistral import MistralToolParser

# detection order: the more specific markers first
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (MistralToolParser, HermesToolParser, Llama3JsonToolParser)
}


def detect_tool_parser(template: str | None) -> str | None:
    """The parser whose syntax the chat template writes, or None."""
    if not template:
        return None
    for name, cls in TOOL_PARSERS.items():
        if cls.matches_template(template):
            return name
    return None


def check_tool_parser_name(name: str) -> str:
    if name not in TOOL_PARSERS:
        raise ConfigError(f"--tool-call-parser {name!r} is unknown; use one of "
                          f"{', '.join(sorted(TOOL_PARSERS))}")
    return name


def get_tool_parser(name: str, tokenizer: Any = None) -> ToolParser:
    return TOOL_PARSERS[check_tool_parser_name(name)](tokenizer)


__all__ = ["TOOL_PARSERS", "ExtractedToolCalls", "FunctionSpec", "ToolCall", "ToolCallDelta",
           "ToolParser", "check_tool_parser_name", "detect_tool_parser", "get_tool_parser"]
