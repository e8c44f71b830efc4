"""The interface every tool-call parser implements, and what parsing yields.

A parser (one module per model format, named as vLLM's ``--tool-call-parser``) describes its
format as a ``ToolCallFormat``: the marker that opens a block of calls, what separates and closes
the calls of a block, and the key that holds a call's arguments. From that one description come
both the non-streaming result (``ToolParser.parse``) and the streaming deltas
(``ToolParser.stream``), by the same state machine (stream.py), so a streamed reply always
reassembles to the non-streamed one. Each parser also writes the grammar (``call_grammar``) that
forces a valid call in its own syntax, for ``tool_choice`` "required" or a named function.
"""

from __future__ import annotations

import json
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

# how a forced call's arguments are written (llguidance's JSON options)
CALL_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolCallFormat:
    start: str  # the marker that opens a block of calls ("" only with bare_json_at_start)
    end: str | None  # the marker that closes a block; None: a block ends where other text starts
    args_keys: tuple[str, ...] = ("arguments",)  # the key of the arguments (the first is written)
    open: str = ""  # text right after ``start`` (mistral: "[")
    separator: str | None = None  # between two calls of one block; None: one call per block
    bare_json_at_start: bool = False  # a reply that starts with "{" is a block (Llama 3)
    # The name-first form (Mistral's tokenizers v11 and later): ``start`` + name (+ ``id_marker``
    # + call id) + ``args_marker`` + the arguments object, one call per ``start``. A block that
    # does not begin with ``open`` is read this way when ``args_marker`` is set.
    args_marker: str | None = None
    id_marker: str | None = None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """A piece of a streamed call: the first one of a call has its id and name (and arguments
    ""), the following ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ExtractedToolCalls:
    content: str | None  # the text outside the calls; None when there is none
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class FunctionSpec:
    """What a grammar needs of one tool: its name and its parameters' JSON schema."""

    name: str
    parameters: dict[str, Any] | None = None

    def schema(self) -> dict[str, Any]:
        """The arguments' schema for llguidance. The JSON is written as chat templates show
        calls to the model (Python's json.dumps / Jinja's tojson: ", " and ": ", no other
        whitespace) unless the schema sets its own "x-guidance" options: a forced call cannot
        wander in whitespace. A tool without parameters takes none (OpenAI: "an empty parameter
        list"): its arguments are ``{}``."""
        schema = dict(self.parameters) if self.parameters else {
            "type": "object", "properties": {}, "additionalProperties": False}
        schema.setdefault("x-guidance", dict(CALL_JSON_FORMAT))
        return schema


def lark_literal(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def lark_json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps(schema, ensure_ascii=False)


class ToolParser(ABC):
    name: ClassVar[str]
    format: ClassVar[ToolCallFormat]
    # the format's markers are special tokens that the detokenizer must keep in the text
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    @classmethod
    @abstractmethod
    def matches_template(cls, template: str) -> bool:
        """Whether a chat template writes tool calls in this format."""

    def new_call_id(self) -> str:
        return "call_" + "".join(secrets.choice(string.ascii_letters + string.digits)
                                 for _ in range(24))

    def strip_texts(self) -> tuple[str, ...]:
        """Texts removed from the content (special tokens, when they are kept in the text)."""
        if not self.needs_special_tokens or self.tokenizer is None:
            return ()
        specials = getattr(self.tokenizer, "all_special_tokens", None) or []
        return tuple(t for t in specials if t and t != self.format.start)

    def stream(self, max_calls: int | None = None):
        """A fresh incremental parser of one reply (stream.ToolCallStream)."""
        from soarllm.serve.tool_parsers.stream import ToolCallStream

        return ToolCallStream(self.format, self.new_call_id, max_calls, self.strip_texts())

    def parse(self, text: str, max_calls: int | None = None) -> ExtractedToolCalls:
        """The calls in a whole reply, and the text outside them."""
        s = self.stream(max_calls)
        return s.collect(s.feed(text) + s.finish())

    # -- forcing a call (tool_choice "required" or a named function) ----------------------

    def marker(self, text: str) -> str:
        """A marker of the format in Lark: the token itself (llguidance's ``<[id]>``) when the
        tokenizer has ``text`` as one added token, since llguidance never matches an added
        token against text (Qwen's ``<tool_call>``, Mistral's ``[TOOL_CALLS]``); else the
        text."""
        tok = self.tokenizer
        added = getattr(tok, "added_tokens_decoder", None) or {}
        for token_id, token in added.items():
            if str(token) == text:
                return f"<[{token_id}]>"
        return lark_literal(text)

    @abstractmethod
    def call_rule(self, function: FunctionSpec, args_rule: str) -> str:
        """The Lark expression of one call of ``function`` (arguments: rule ``args_rule``)."""

    def block_grammar(self, call: str, parallel: bool) -> str:
        """The Lark rule ``start`` of a whole reply made of calls (rule ``call``): one, or with
        ``parallel`` one or more."""
        return f"start: {call}" + (f' ("\\n" {call})*' if parallel else "")

    def call_grammar(self, functions: list[FunctionSpec], parallel: bool) -> str:
        """A Lark grammar (llguidance) whose every string is a reply of tool calls in this
        format, each naming one of ``functions`` with arguments valid under its schema."""
        rules = []
        alternatives = []
        for i, f in enumerate(functions):
            rules.append(f"args_{i}: {lark_json(f.schema())}")
            alternatives.append(self.call_rule(f, f"args_{i}"))
        lines = [self.block_grammar("call", parallel), "call: " + " | ".join(alternatives)]
        return "\n".join(lines + rules) + "\n"
