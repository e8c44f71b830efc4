"""Field types the request models share (protocol_openai.py, protocol_tgi.py, routes.py), built so
that the published OpenAPI schema says what the server enforces.

- ``StrictModel``: a field of the wrong type is an error (no "5" for 5); an undeclared field is
  refused by name.
- ``neutral_only(...)``: a field that OpenAI or TGI define but this server cannot honour. Only its
  neutral values pass (null, false, {}, ...); the schema lists them, and anything else is a 400
  that names the field (error type ``UNSUPPORTED``, worded by serve/errors.py).
- ``served_limit(name)``: marks a schema node with a limit of the served model (vocabulary size,
  context length, ...), which serve/openapi.py fills in when the app is built.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

UNSUPPORTED = "unsupported"  # pydantic error type of a neutral_only field set to something else

# names of the served model's limits (see serve/openapi.py for what each becomes)
LIMIT_KEY = "x-soar-limit"
TOKEN_ID = "token_id"  # a token id the engine takes: maximum vocab_size - 1
TOKENIZER_ID = "tokenizer_id"  # a token id the tokenizer decodes: maximum len(tokenizer) - 1
NEW_TOKENS = "new_tokens"  # tokens to generate: maximum max_model_len - 1
PROMPT_CHARS = "prompt_chars"  # text longer than this cannot fit in the context: maxLength
PROMPT_TOKENS = "prompt_tokens"  # a prompt of token ids: maxItems max_model_len - 1
FIM = "fim"  # a fill-in-the-middle field: only null when the model has no FIM tokens


def served_limit(name: str) -> dict[str, Any]:
    return {LIMIT_KEY: name}


# FastAPI writes ``minimum``/``maximum`` as floats, which cannot hold 2**63 - 1 exactly; bounds
# that large travel under this key and serve/openapi.py writes them back as exact integers.
INT_RANGE_KEY = "x-soar-int-range"


def int_field(default: Any, ge: int, le: int, **kwargs: Any) -> Any:
    """``Field(default, ge=ge, le=le)`` whose published bounds stay exact integers."""
    return Field(default, ge=ge, le=le, json_schema_extra={INT_RANGE_KEY: [ge, le]}, **kwargs)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def neutral_only(*neutral: Any) -> Any:
    """An ``Any`` field that accepts only the given JSON values (compared with their JSON type:
    ``0`` is not ``false``)."""
    accepted = " or ".join(json.dumps(v) for v in neutral)

    def check(value: Any) -> Any:
        if not any(type(value) is type(n) and value == n for n in neutral):
            raise PydanticCustomError(
                UNSUPPORTED, "not supported by this server; remove it or send {accepted}",
                {"accepted": accepted},
            )
        return value

    schema = {"enum": list(neutral),
              "description": f"not supported by this server: only {accepted} is accepted"}
    return Annotated[Any, AfterValidator(check), WithJsonSchema(schema)]


def _token_id(value: int) -> int:
    if value < 0:
        raise PydanticCustomError(
            "token_id", "token ids are integers from 0 to the vocabulary size - 1, got {value}",
            {"value": value},
        )
    return value


def token_id_type(limit: str) -> Any:
    """A token id: never negative here; the vocabulary bound is the server's (``limit``)."""
    return Annotated[int, AfterValidator(_token_id),
                     Field(json_schema_extra={"minimum": 0, **served_limit(limit)})]


TokenId = token_id_type(TOKEN_ID)
TokenizerId = token_id_type(TOKENIZER_ID)

# Text that goes to the tokenizer: never longer than the context could hold.
PromptText = Annotated[str, Field(json_schema_extra=served_limit(PROMPT_CHARS))]
NonEmptyPromptText = Annotated[str, Field(min_length=1,
                                          json_schema_extra=served_limit(PROMPT_CHARS))]
