"""StructuredOutputParams -> the llguidance grammar that enforces it, and the check that
llguidance can enforce it (whose error names what it cannot)."""

from __future__ import annotations

import json
from typing import Any

import llguidance

from soarllm.errors import InvalidRequestError
from soarllm.sampling_params import StructuredOutputParams

# JSON: llguidance's whitespace, but at most this many characters between two tokens of the
# document, so that a model cannot pad a document forever (the schema's own "x-guidance"
# options override this).
JSON_DEFAULTS: dict[str, Any] = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}

_MAX_DETAIL = 500

_WHAT = {
    "json": "the JSON schema",
    "json_object": "the JSON object constraint",
    "regex": "the regex",
    "choice": "the choice list",
    "grammar": "the grammar",
}
_HOW = {
    "json": "remove or rewrite the keyword it names (llguidance supports most of JSON Schema; "
            "not: if/then/else, not, dependentSchemas, unevaluated*)",
    "json_object": "",
    "regex": "use Rust regex syntax (no look-around, no backreferences)",
    "choice": "send non-empty strings",
    "grammar": "send a Lark grammar with a 'start' rule or a GBNF grammar with a 'root' rule",
}


def limits() -> llguidance.LLParserLimits:
    # verbose_errors=False: a rejected request's error message does not echo parser internals
    return llguidance.LLParserLimits(verbose_errors=False)


def problem(params: StructuredOutputParams, detail: str,
            param: str | None = "structured_outputs") -> InvalidRequestError:
    kind = params.kind
    # llguidance's messages span lines (a caret under the culprit): one line, bounded
    detail = " ".join(part.strip() for part in detail.splitlines() if part.strip())
    detail = (detail[:_MAX_DETAIL] + "...") if len(detail) > _MAX_DETAIL else detail or "unknown"
    how = _HOW.get(kind, "")
    message = f"{_WHAT[kind]} cannot be enforced: {detail}" + (f"; {how}" if how else "")
    return InvalidRequestError(message, param=param)


def grammar_of(params: StructuredOutputParams,
               param: str | None = "structured_outputs") -> str:
    """The llguidance grammar (its JSON text) of ``params``."""
    kind = params.kind
    try:
        if kind == "json":
            schema = params.json
            if isinstance(schema, str):
                schema = json.loads(schema)
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be a JSON object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                 defaults=JSON_DEFAULTS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(params.choice))
        # Lark (``start: ...``) as is; GBNF (``root ::= ...``) converted to Lark
        return llguidance.grammar_from("grammar", params.grammar)
    except ValueError as e:  # json.JSONDecodeError included
        raise problem(params, str(e), param) from None


def check_structured_output(params: StructuredOutputParams,
                            param: str | None = "structured_outputs") -> None:
    """Refuse (InvalidRequestError naming ``param``) a constraint llguidance cannot enforce.
    Tokenizer-free: cheap enough to run before a request is queued."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar_of(params, param), None, limits=limits())
    if is_error:
        raise problem(params, messages[0] if messages else "", param)
