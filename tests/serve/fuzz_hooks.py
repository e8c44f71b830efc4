"""Schemathesis hooks of tests/serve/test_fuzz_live.py, loaded by the ``schemathesis`` CLI through
SCHEMATHESIS_HOOKS (not a test module).

``schema_valid_request_accepted``: a request the published schema allows is answered 2xx, or
refused only for a rule the schema cannot state field by field (the prompt and max_tokens must fit
the context together, ``best_of`` must equal ``n``, ...); each such rule is written in the
description of the fields it ties together. Schemathesis' own ``positive_data_acceptance`` knows
no such rules, so it is not used.
"""

from __future__ import annotations

from typing import Any

import schemathesis

# The server's words for each rule that ties fields together (or a field to the prompt's length).
CROSS_FIELD_REFUSALS = (
    "maximum context length",  # prompt (+ suffix) + max_tokens within max_model_len
    "only with echo=true",  # max_tokens=0 scores a prompt: needs echo
    "completions; at most",  # prompts x n
    "best_of must be null or equal to n",
    "only allowed with stream=true",  # stream_options
    "needs logprobs=true",  # top_logprobs
    "max_tokens and max_completion_tokens disagree",
    "min_tokens must be in [0, max_tokens]",
    "'suffix' needs a text prompt",  # fill-in-the-middle with token ids
    "/infill needs a model with fill-in-the-middle tokens",  # the model's, not the body's, rule
    "n_cmpl > 1 is served only with stream=false",  # /infill: several completions, one stream
    "send only one of response_format, guided_json",  # one structured-output constraint
    "cannot be enforced",  # a schema / regex / grammar the grammar engine cannot enforce
    "has no tool support in its chat template",  # tools: the model's rule, not the body's
    "in no tool-call syntax this server recognizes",  # tools: the model's template again
    "which is not in tools",  # a named tool_choice must be one of the tools
    "twice; give each function its own name",  # tools with one name twice
    "not both: the reply cannot be a call",  # a forced call and response_format / guided_*
)
# Statuses that say nothing about the request's shape (credentials, unknown model, load).
_NOT_ABOUT_THE_SHAPE = frozenset({401, 403, 404, 409, 429, 503})


def _error_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):  # OpenAI's shape
        return str(error.get("message", ""))
    return str(error)  # TGI's shape


@schemathesis.check
def schema_valid_request_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status >= 500 or status in _NOT_ABOUT_THE_SHAPE:
        return None  # 5xx: not_a_server_error's business
    message = _error_message(response)
    if any(rule in message for rule in CROSS_FIELD_REFUSALS):
        return None
    raise AssertionError(
        f"the schema allows this request, but the server refused it with {status}: {message}")
