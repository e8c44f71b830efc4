"""The OpenAPI schema the server publishes (/openapi.json, /docs) with the served model's limits.

The request models carry static bounds themselves; what depends on the model served (vocabulary
size, context length, the longest text worth tokenizing, fill-in-the-middle tokens) is marked in
them with ``served_limit(name)`` (serve/request_fields.py) and filled in here, so that
schema-driven clients and fuzzers see the limits the server enforces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from soarllm.serve.request_fields import (
    FIM,
    INT_RANGE_KEY,
    LIMIT_KEY,
    NEW_TOKENS,
    PROMPT_CHARS,
    PROMPT_TOKENS,
    TOKEN_ID,
    TOKENIZER_ID,
)


@dataclass(frozen=True)
class ServedLimits:
    max_model_len: int
    vocab_size: int  # token ids the engine takes are below this
    tokenizer_size: int  # token ids the tokenizer decodes are below this
    max_prompt_chars: int  # longer text cannot fit in the context (serve/tokenization.py)
    fim: bool  # the tokenizer has fill-in-the-middle tokens


def _lower(node: dict[str, Any], key: str, value: int) -> None:
    node[key] = min(node.get(key, value), value)


def _apply(node: dict[str, Any], name: str, limits: ServedLimits) -> dict[str, Any]:
    """The node with limit ``name`` applied (to each non-null member of a union)."""
    if name == FIM:
        if limits.fim:
            return node
        return {"type": "null", "default": None,
                "description": "not supported by this model (it has no fill-in-the-middle "
                "tokens): only null is accepted"}
    members = node.get("anyOf") or node.get("oneOf") or [node]
    for member in members:
        if member.get("type") == "null":
            continue
        if name == TOKEN_ID:
            _lower(member, "maximum", limits.vocab_size - 1)
        elif name == TOKENIZER_ID:
            _lower(member, "maximum", limits.tokenizer_size - 1)
        elif name == NEW_TOKENS:
            _lower(member, "maximum", limits.max_model_len - 1)
        elif name == PROMPT_CHARS:
            _lower(member, "maxLength", limits.max_prompt_chars)
        elif name == PROMPT_TOKENS:
            _lower(member, "maxItems", limits.max_model_len - 1)
        else:
            raise ValueError(f"unknown served limit {name!r}")
    return node


def apply_limits(schema: Any, limits: ServedLimits) -> Any:
    """``schema`` with every ``served_limit`` marker replaced by the limit (a new object)."""
    if isinstance(schema, list):
        return [apply_limits(v, limits) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: apply_limits(v, limits) for k, v in schema.items()
           if k not in (LIMIT_KEY, INT_RANGE_KEY)}
    if INT_RANGE_KEY in schema:
        low, high = schema[INT_RANGE_KEY]
        for member in out.get("anyOf") or [out]:
            if member.get("type") == "integer":
                member["minimum"], member["maximum"] = int(low), int(high)
    if LIMIT_KEY in schema:
        out = _apply(out, schema[LIMIT_KEY], limits)
    return out


def install_openapi(app: FastAPI, limits: ServedLimits) -> None:
    """Make ``app.openapi()`` (what /openapi.json and /docs serve) carry ``limits``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = apply_limits(generate(), limits)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
