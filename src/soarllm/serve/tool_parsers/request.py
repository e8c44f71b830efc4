"""A chat request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls``, checked against the
served model, as what the route needs: the parser of the reply, the tools for the chat template,
and for a forced call the grammar that makes it valid.

How a call is forced: the whole reply must match a Lark grammar (llguidance) written by the
parser in the model's own call syntax, with each function's arguments as a ``%json{schema}``
rule, e.g. for hermes and a named function ``f``::

    start: call
    call: "<tool_call>\\n{\\"name\\": \\"f\\", \\"arguments\\": " args_0 "}\\n</tool_call>"
    args_0: %json {...f's parameters...}

"required" lists every tool as an alternative of ``call`` (an anyOf over the tools), and with
parallel calls allowed, ``start`` repeats ``call``. A Lark grammar rather than one JSON schema of
the call object: it fixes the text around the JSON too (the tags, Mistral's special token, the
key order the template shows the model), so the reply is exactly what the parser reads, for
every format alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import llguidance

from soarllm.chat_utils import template_supports_tools
from soarllm.errors import InvalidRequestError
from soarllm.sampling_params import StructuredOutputParams
from soarllm.serve.protocol_openai import ChatCompletionRequest
from soarllm.serve.tool_parsers import TOOL_PARSERS, detect_tool_parser, get_tool_parser
from soarllm.serve.tool_parsers.base import FunctionSpec, ToolParser
from soarllm.structured_output.grammar import check_structured_output, limits

FORCED_NEEDS_TOOLS = "needs tools"
_HOW_SCHEMA = ("remove or rewrite the keyword it names (llguidance supports most of JSON Schema; "
               "not: if/then/else, not, dependentSchemas, unevaluated*)")


@dataclass
class ToolRequest:
    parser: ToolParser
    tools: list[dict[str, Any]]  # OpenAI's tool objects, for the chat template
    max_calls: int | None  # None: any number
    grammar: StructuredOutputParams | None  # a forced call; None: the model decides


def _choice_text(choice: Any) -> str:
    if isinstance(choice, str):
        return repr(choice)
    return f"{{function: {choice.function.name!r}}}"


def tool_request(req: ChatCompletionRequest, tokenizer: Any, parser_name: str | None,
                 model_name: str) -> ToolRequest | None:
    """None when the reply is plain text (no tools, or tool_choice "none"); InvalidRequestError
    naming the field for a request this model cannot serve."""
    tools = req.tools or []
    choice = req.tool_choice
    forced = choice == "required" or not isinstance(choice, (str, type(None)))
    if forced and not tools:
        raise InvalidRequestError(
            f"tool_choice {_choice_text(choice)} {FORCED_NEEDS_TOOLS}; send the functions in "
            "'tools', or tool_choice \"auto\" or \"none\"", param="tool_choice")
    names = [t.function.name for t in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidRequestError(f"tools names the function(s) {', '.join(twice)} twice; give "
                                  "each function its own name", param="tools")
    if choice is not None and not isinstance(choice, str) and choice.function.name not in names:
        raise InvalidRequestError(
            f"tool_choice names the function {choice.function.name!r}, which is not in tools "
            f"({', '.join(names)}); name one of them", param="tool_choice")
    if not tools or choice == "none":
        return None
    if not template_supports_tools(tokenizer):
        raise InvalidRequestError(
            f"the model {model_name!r} has no tool support in its chat template, so it cannot be "
            f"given tools (tool_choice {_choice_text(choice or 'auto')}); send tool_choice "
            "\"none\" or no tools, start the server with a --chat-template that writes tools, or "
            "serve a model with a tool-call template, e.g. "
            "`soar serve qwen2.5-coder-0.5b-instruct`", param="tools")
    name = parser_name or detect_tool_parser(getattr(tokenizer, "chat_template", None))
    if name is None:
        raise InvalidRequestError(
            f"the chat template of {model_name!r} writes tools, but in no tool-call syntax this "
            "server recognizes; start the server with --tool-call-parser NAME (one of "
            f"{', '.join(sorted(TOOL_PARSERS))})", param="tools")
    parser = get_tool_parser(name, tokenizer)
    parallel = req.parallel_tool_calls is not False
    grammar = None
    if forced:
        if choice == "required":
            chosen = [(i, t) for i, t in enumerate(tools)]
        else:
            chosen = [(i, t) for i, t in enumerate(tools) if t.function.name == choice.function.name]
        functions = []
        for i, t in chosen:
            spec = FunctionSpec(t.function.name, t.function.parameters)
            _check_schema(spec, i)
            functions.append(spec)
        parallel = parallel and choice == "required"  # a named function: exactly one call
        grammar = StructuredOutputParams(grammar=parser.call_grammar(functions, parallel))
        check_structured_output(grammar, param="tool_choice")
    return ToolRequest(parser=parser, tools=[t.model_dump(exclude_none=True) for t in tools],
                       max_calls=None if parallel else 1, grammar=grammar)


def _check_schema(spec: FunctionSpec, index: int) -> None:
    where = f"tools[{index}].function.parameters"
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.schema())
    except ValueError as e:
        raise InvalidRequestError(f"{where} cannot be enforced: {_one_line(str(e))}; "
                                  f"{_HOW_SCHEMA}", param="tools") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, None, limits=limits())
    if is_error:
        raise InvalidRequestError(
            f"{where} cannot be enforced: {_one_line(messages[0] if messages else '')}; "
            f"{_HOW_SCHEMA}", param="tools")


def _one_line(detail: str, limit: int = 500) -> str:
    detail = " ".join(part.strip() for part in detail.splitlines() if part.strip())
    return (detail[:limit] + "...") if len(detail) > limit else detail or "unknown"
