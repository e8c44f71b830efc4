"""Every failure becomes a JSON error body with the right status: OpenAI's shape on /v1 routes,
TGI's shape on TGI routes. A client's mistake is always a 4xx that says what to change; only a bug
in the server is a 500.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from soarllm.errors import InvalidRequestError, OverloadedError, SoarError
from soarllm.serve.request_fields import UNSUPPORTED

logger = logging.getLogger(__name__)

TGI_PATHS = frozenset({"/", "/generate", "/generate_stream"})

_HTTP_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}

# TGI's error_type values (the text-generation client maps them to its exception classes).
_TGI_ERROR_TYPES = {
    "invalid_request_error": "validation",
    "not_found_error": "validation",
    "overloaded_error": "overloaded",
    "rate_limit_error": "overloaded",
    "authentication_error": "authentication",
}


def openai_error_body(
    message: str, error_type: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def tgi_error_body(message: str, error_type: str) -> dict[str, Any]:
    return {"error": message, "error_type": _TGI_ERROR_TYPES.get(error_type, "generation")}


def error_body_for(path: str, status: int, message: str, error_type: str,
                   param: str | None = None) -> dict[str, Any]:
    if path in TGI_PATHS:
        return tgi_error_body(message, error_type)
    code = "model_not_found" if error_type == "not_found_error" and param == "model" else None
    return openai_error_body(message, error_type, param, code)


def tgi_status(status: int, error_type: str) -> int:
    """TGI answers validation errors with 422."""
    return 422 if status == 400 and error_type == "invalid_request_error" else status


def error_response(path: str, status: int, message: str, error_type: str,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    if path in TGI_PATHS:
        status = tgi_status(status, error_type)
    return JSONResponse(
        error_body_for(path, status, message, error_type, param), status_code=status,
        headers=headers,
    )


def soar_error_response(path: str, exc: SoarError) -> JSONResponse:
    headers = None
    retry_after = getattr(exc, "retry_after", None)  # 503 overloaded, 429 rate limited
    if retry_after is not None:
        headers = {"Retry-After": str(retry_after)}
    if exc.status_code >= 500 and not isinstance(exc, OverloadedError):
        logger.error("request failed: %s", exc.message)
    return error_response(path, exc.status_code, exc.message, exc.error_type, exc.param, headers)


def internal_error_response(path: str, exc: BaseException) -> JSONResponse:
    """A bug in the server: 500, naming the exception's type (not its text, which may hold
    internals)."""
    return error_response(
        path, 500, f"internal server error ({type(exc).__name__}); this is a bug in the server, "
        "not in your request", "internal_error",
    )


# -- translating pydantic validation errors into one readable sentence ---------------------------


_BASIC_TYPES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
# pydantic's names for validated or constrained members of a union ("list[constrained-str]",
# "function-after[_token_id(), int]"): the plain type is what a client can act on
_WRAPPED = re.compile(r"function-(?:after|before|wrap|plain)\[[^\[\],]*\(\), ([^\[\]]*)\]")


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union member it tried in the error location ("str", "list[int]",
    "TextContentPart"); field names here are snake_case."""
    if not isinstance(part, str) or not part:
        return False
    return (part in _BASIC_TYPES or "[" in part or part[0].isupper()
            or part.startswith(("constrained-", "function-")))


def _readable_tag(tag: str) -> str:
    tag = tag.replace("constrained-", "")
    while True:
        plain = _WRAPPED.sub(r"\1", tag)
        if plain == tag:
            return tag
        tag = plain


def _join(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        p = str(p)
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def _split_loc(loc: tuple[Any, ...]) -> tuple[str, str | None]:
    """(field path up to the first union member, that member's name or None)."""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    for i, p in enumerate(parts):
        if _is_union_tag(p):
            return _join(parts[:i]), str(p)
    return _join(parts), None


def _field_path(loc: tuple[Any, ...]) -> str:
    return _split_loc(loc)[0]


def _is_type_error(e: dict[str, Any]) -> bool:
    """The input is not of the member's type at all (as opposed to a value out of its bounds)."""
    return e["type"].endswith("_type") or e["type"] in (
        "literal_error", "none_required", "is_instance_of", "missing", "extra_forbidden",
        "enum", "union_tag_invalid", "union_tag_not_found", "model_attributes_type")


def _message(e: dict[str, Any]) -> str:
    """pydantic's message, saying "empty" where a value needs at least one character or item."""
    if e["type"] in ("string_too_short", "too_short") and e.get("ctx", {}).get("min_length") == 1:
        return "must not be empty"
    msg = e.get("msg", "invalid value")
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _unsupported_error(errors: list[dict[str, Any]]) -> InvalidRequestError | None:
    """Fields that another API defines and this server cannot honour (request_fields.py's
    ``neutral_only``), set to something other than their neutral values."""
    bad = {_field_path(e["loc"]): e.get("ctx", {}).get("accepted", "null")
           for e in errors if e["type"] == UNSUPPORTED}
    if not bad:
        return None
    parts = [f"{name} (remove it or send {accepted})" for name, accepted in bad.items()]
    return InvalidRequestError(
        f"unsupported field(s) for this server: {'; '.join(parts)}", param=next(iter(bad)))


def _union_error(errors: list[dict[str, Any]], field: str) -> InvalidRequestError:
    """The value of ``field`` matched no member of its union. When the input fits some members
    but breaks their bounds (or fits the shape of only one), describe that member's errors; else
    list the accepted types."""
    by_tag: dict[str, list[dict[str, Any]]] = {}
    top_level_mismatch: set[str] = set()
    for e in errors:
        parts = [p for p in e["loc"] if p not in ("body", "query", "path")]
        f, tag = _split_loc(e["loc"])
        if f != field or tag is None:
            continue
        by_tag.setdefault(tag, []).append(e)
        if parts[-1] == tag and _is_type_error(e):
            top_level_mismatch.add(tag)
    near = [t for t, es in by_tag.items() if not any(_is_type_error(e) for e in es)]
    if not near:
        shaped = [t for t in by_tag if t not in top_level_mismatch]
        near = shaped if len(shaped) == 1 else []
    if near:  # the same sentence as for a plain field, at the path inside the value
        inner = [{**e, "loc": tuple(p for p in e["loc"] if not _is_union_tag(p))}
                 for t in near for e in by_tag[t]]
        return InvalidRequestError(validation_error(inner).message, param=field)
    tags = list(dict.fromkeys(_readable_tag(t) for t in by_tag))
    return InvalidRequestError(
        f"invalid value for '{field}'{_input_repr(errors, field)}: expected "
        f"{' or '.join(tags)}", param=field)


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequestError:
    """One InvalidRequestError describing pydantic errors, naming the fields involved."""
    extra = [_field_path(e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        names = ", ".join(sorted(set(extra)))
        return InvalidRequestError(
            f"unsupported field(s): {names}; remove them (see the API reference for the "
            "fields this server accepts)",
            param=extra[0],
        )
    unsupported = _unsupported_error(errors)
    if unsupported is not None:
        return unsupported
    for e in errors:
        if e["type"] in ("json_invalid", "json_type"):
            detail = e.get("ctx", {}).get("error", e.get("msg", ""))
            return InvalidRequestError(
                f"the request body is not valid JSON ({detail}); send a JSON object"
            )
    if any(not _field_path(e["loc"]) for e in errors):
        if any(e["type"] == "missing" for e in errors):
            return InvalidRequestError("the request body is empty; send a JSON object")
        return InvalidRequestError(
            "the request body must be a JSON object (with Content-Type: application/json)"
        )
    missing = [_field_path(e["loc"]) for e in errors if e["type"] == "missing"
               and _split_loc(e["loc"])[1] is None]
    if missing:
        names = ", ".join(sorted(set(missing)))
        return InvalidRequestError(f"missing required field(s): {names}", param=missing[0])
    first_field, first_tag = _split_loc(errors[0]["loc"])
    if first_tag is not None:
        return _union_error(errors, first_field)
    msgs = [_message(e) for e in errors if _field_path(e["loc"]) == first_field]
    unique = list(dict.fromkeys(msgs))
    detail = unique[0] if len(unique) == 1 else "; or ".join(unique[:4])
    got = _input_repr(errors, first_field)
    return InvalidRequestError(f"invalid value for '{first_field}'{got}: {detail}",
                               param=first_field)


def _input_repr(errors: list[dict[str, Any]], field: str) -> str:
    for e in errors:
        if _split_loc(e["loc"]) == (field, None) or (
                _field_path(e["loc"]) == field and "input" in e and e is errors[0]):
            text = json.dumps(e["input"], default=str)
            return f" (got {text[:80]}{'...' if len(text) > 80 else ''})"
    return ""


# -- installing the handlers -------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SoarError)
    async def _soar(request: Request, exc: SoarError) -> JSONResponse:
        return soar_error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return soar_error_response(request.url.path, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message = f"no route {request.method} {request.url.path}; see GET /docs for the API"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        error_type = _HTTP_ERROR_TYPES.get(status, "invalid_request_error" if status < 500
                                           else "internal_error")
        return error_response(request.url.path, status, message, error_type,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error_response(request.url.path, exc)
