"""Parsing request bodies: JSON as RFC 8259 defines it, with every way it can go wrong answered as
a 400 that says what to change.

Python's ``json`` module accepts things that break later or cannot be answered: lone UTF-16
surrogates (``"\\ud800"``, which no UTF-8 encoder can write back), ``NaN`` and ``Infinity``,
numbers too large for a float or with thousands of digits, and nesting deep enough to exhaust the
interpreter's stack. ``parse_json_body`` refuses each of them by name, before any route sees the
body.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from fastapi import HTTPException
from starlette.requests import Request

MAX_DEPTH = 64  # objects/arrays inside each other; no API field needs more than a few
MAX_INT_DIGITS = 100


class BodyParseError(HTTPException):
    """A body that is JSON-shaped but cannot be accepted (HTTP 400; 422 on TGI routes)."""

    def __init__(self, message: str):
        super().__init__(status_code=400, detail=message)


def _reject_constant(name: str) -> Any:
    raise BodyParseError(f"the request body contains {name}, which is not valid JSON; send a "
                         "finite number (or null)")


def _finite_float(text: str) -> float | int:
    """A number written with a fraction or an exponent. One with an integral value ("341.0",
    "1e3") is an int, as JSON Schema counts it an integer: integer fields take it, and float
    fields take ints anyway."""
    value = float(text)
    if not math.isfinite(value):
        raise BodyParseError(f"the number {text[:40]} in the request body is too large for a "
                             "64-bit float; send a smaller number")
    if value.is_integer():
        exact = Decimal(text)
        if exact == exact.to_integral_value() and abs(exact) < 10**MAX_INT_DIGITS:
            return int(exact)
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BodyParseError(f"a number in the request body has {len(text.lstrip('-'))} digits "
                             f"(at most {MAX_INT_DIGITS}); send a smaller number")
    return int(text)


def _decode(body: bytes) -> str:
    encoding = json.detect_encoding(body)  # UTF-8, or UTF-16/32 when the bytes say so
    try:
        return body.decode(encoding)
    except UnicodeDecodeError as e:
        raise BodyParseError(
            f"the request body is not valid {encoding.upper()} (bad byte(s) "
            f"{body[e.start:e.end][:8]!r} at offset {e.start}); encode the JSON as UTF-8"
        ) from None


def _path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "the body"


def _is_valid_unicode(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_tree(value: Any) -> None:
    """Refuse strings with lone surrogates and nesting deeper than MAX_DEPTH (no recursion)."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if not _is_valid_unicode(node):
                bad = next(c for c in node if 0xD800 <= ord(c) <= 0xDFFF)
                raise BodyParseError(
                    f"{_path(path)} contains a lone UTF-16 surrogate (\\u{ord(bad):04x}), "
                    "which is not a Unicode character; pair each high surrogate "
                    "(\\ud800-\\udbff) with a low one (\\udc00-\\udfff) or remove it"
                )
            continue
        if not isinstance(node, (dict, list)):
            continue
        if len(path) >= MAX_DEPTH:
            raise BodyParseError(
                f"the request body is nested more than {MAX_DEPTH} levels deep (at "
                f"{_path(path)[:200]}); no field of this API needs that"
            )
        if isinstance(node, dict):
            for k, v in node.items():
                if not _is_valid_unicode(k):
                    raise BodyParseError(
                        f"a key in {_path(path)} contains a lone UTF-16 surrogate; send valid "
                        "Unicode"
                    )
                stack.append((v, [*path, k]))
        else:
            stack.extend((v, [*path, i]) for i, v in enumerate(node))


def parse_json_body(body: bytes) -> Any:
    """The JSON value of ``body``; json.JSONDecodeError for syntax errors (FastAPI reports
    those), BodyParseError for everything else that cannot be accepted."""
    text = _decode(body)
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           parse_int=_bounded_int)
    except RecursionError:
        raise BodyParseError(
            f"the request body is nested too deeply (more than {MAX_DEPTH} levels); no field of "
            "this API needs that"
        ) from None
    check_tree(value)
    return value


class JSONBodyRequest(Request):
    """A Request whose ``json()`` is ``parse_json_body``."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json
