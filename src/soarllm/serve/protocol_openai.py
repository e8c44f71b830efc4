"""OpenAI API request and response models (the subset soarllm serves).

The request models are the published schema, and the schema says what the server enforces:
strict types, undeclared fields refused by name, the sampling bounds of
soarllm/sampling_params.py, non-empty prompts, token ids and lengths within the served model's
limits (filled in by serve/openapi.py), and the fields OpenAI defines but this server cannot
honour limited to their neutral values (``neutral_only``). What one field cannot say (the prompt
and max_tokens together must fit the context, ``best_of`` must equal ``n``, ...) is written in the
field's description and refused with a 400 that names the field.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from soarllm.outputs import CompletionOutput
from soarllm.sampling_params import (
    MAX_ABS_PENALTY,
    MAX_GUIDED_CHOICES,
    MAX_LOGPROBS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_SPECULATIVE_TOKENS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
)
from soarllm.serve.request_fields import (
    FIM,
    NEW_TOKENS,
    PROMPT_TOKENS,
    NonEmptyPromptText,
    PromptText,
    StrictModel,
    TokenId,
    int_field,
    neutral_only,
    served_limit,
)

# int64, the range OpenAI documents for seeds
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_STOP_TOKEN_IDS = 64
MAX_MIN_TOKENS = 1_000_000

StopString = Annotated[str, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


def _new_tokens(minimum: int) -> Any:
    """A number of tokens to generate; at most the context length - 1 (a prompt has >= 1)."""
    return Annotated[int, Field(ge=minimum, json_schema_extra=served_limit(NEW_TOKENS))]


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingExtensions(StrictModel):
    """vLLM-style sampling fields that clients send through ``extra_body``."""

    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K,
                              description="keep the k most likely tokens; -1 or 0: all")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)
    min_tokens: int | None = Field(None, ge=0, le=MAX_MIN_TOKENS,
                                   description="at most max_tokens")
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    num_speculative_tokens: int | None = Field(
        None, ge=0, le=MAX_SPECULATIVE_TOKENS,
        description="draft tokens verified per step for this request; 0: no speculation")


class TextContentPart(StrictModel):
    type: Literal["text"]
    text: PromptText


class Prediction(StrictModel):
    """Predicted Outputs: text the output is expected to mostly repeat (a file being edited).
    It only speeds generation up: the output is the same as without it."""

    type: Literal["content"]
    content: PromptText | list[TextContentPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


_ONE_CONSTRAINT = ("at most one of response_format, guided_json, guided_regex, guided_choice and "
                   "guided_grammar; it must be one the grammar engine (llguidance) can enforce")


class GuidedDecoding(StrictModel):
    """vLLM's structured-output fields (``extra_body``): the output is constrained to match."""

    guided_json: dict[str, Any] | Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a JSON schema (object or its JSON text) the output must validate "
        f"against; {_ONE_CONSTRAINT}")
    guided_regex: str | None = Field(
        None, min_length=1, description="a regex the whole output must match (Rust regex "
        f"syntax: no look-around or backreferences); {_ONE_CONSTRAINT}")
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, max_length=MAX_GUIDED_CHOICES,
        description=f"the output is one of these strings; {_ONE_CONSTRAINT}")
    guided_grammar: str | None = Field(
        None, min_length=1, description="a context-free grammar the output must match: Lark "
        f"(start: ...) or GBNF (root ::= ...); {_ONE_CONSTRAINT}")


class _CommonSampling(SamplingExtensions, GuidedDecoding):
    model: str | None = Field(None, max_length=1000,
                              description="a served model name (GET /v1/models); null or '': "
                              "the first")
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="0: greedy")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop | None = None
    seed: int | None = int_field(None, ge=_INT64_MIN, le=_INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream=true")
    user: str | None = Field(None, max_length=1000)
    logit_bias: neutral_only(None, {}) = None
    prediction: Prediction | None = None


# -- /v1/completions ----------------------------------------------------------------------------

PromptTokenIds = Annotated[list[TokenId],
                           Field(min_length=1, json_schema_extra=served_limit(PROMPT_TOKENS))]
Prompt = (
    NonEmptyPromptText
    | Annotated[list[NonEmptyPromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
    | PromptTokenIds
    | Annotated[list[PromptTokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
)


class CompletionRequest(_CommonSampling):
    prompt: Prompt = Field(
        description="text, a list of texts, token ids, or a list of token-id lists; "
        "(prompts x n) at most 512; each prompt plus max_tokens must fit the context length",
    )
    suffix: PromptText | None = Field(
        None, description="fill-in-the-middle: needs a text prompt and a model with FIM tokens",
        json_schema_extra=served_limit(FIM),
    )
    max_tokens: _new_tokens(0) | None = Field(
        16, description="0 only with echo=true (to score a prompt); null: up to the context")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N,
                                description="only null or equal to n (no best-of selection)")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    """Predicted Outputs: draft tokens of the prediction that the output confirmed (accepted) or
    that were computed and thrown away (rejected; OpenAI bills them as completion tokens, this
    server just reports them)."""

    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


def prediction_usage(outputs: Iterable[CompletionOutput]) -> tuple[int, int]:
    """(accepted, rejected) prediction tokens summed over a request's choices."""
    accepted = rejected = 0
    for c in outputs:
        accepted += c.accepted_prediction_tokens or 0
        rejected += c.rejected_prediction_tokens or 0
    return accepted, rejected


def usage(prompt_tokens: int, completion_tokens: int, cached: int,
          prediction: tuple[int, int] | None = None) -> Usage:
    """``prediction``: (accepted, rejected) prediction tokens, when the request had a prediction."""
    details = None
    if prediction is not None:
        details = CompletionTokensDetails(accepted_prediction_tokens=prediction[0],
                                          rejected_prediction_tokens=prediction[1])
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                 completion_tokens_details=details)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


# -- /v1/chat/completions -------------------------------------------------------------------------


MAX_TOOLS = 128  # functions in one request (OpenAI's limit)
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionCall(StrictModel):
    name: str = Field(max_length=64)
    arguments: str = Field(description="the arguments as JSON text")


class MessageToolCall(StrictModel):
    """A call the assistant made earlier in the conversation (sent back with its result)."""

    id: str = Field(max_length=256)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: PromptText | list[TextContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[MessageToolCall] | None = Field(
        None, description="an assistant message's calls; rendered by the chat template")
    tool_call_id: str | None = Field(
        None, max_length=256, description="a tool message: the id of the call it answers")
    function_call: neutral_only(None) = None
    refusal: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _no_function_role(cls, role: Any) -> Any:
        if role == "function":
            raise PydanticCustomError(
                "unsupported_role", "'function' messages (the legacy function-calling API) are "
                "not supported; send the result as a 'tool' message with the call's "
                "tool_call_id", {})
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            others = [p["type"] for p in content
                      if isinstance(p, dict) and isinstance(p.get("type"), str)
                      and p["type"] != "text"]
            if others:
                raise PydanticCustomError(
                    "unsupported_content", "only 'text' content parts are supported by this "
                    "server, got {others}", {"others": ", ".join(repr(t) for t in others)})
        return content


class JsonSchemaFormat(StrictModel):
    name: str = Field(max_length=64, description="the schema's name")
    description: str | None = Field(None, max_length=10_000)
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="the JSON schema the reply validates against (null: "
        "any JSON object); it must be one the grammar engine (llguidance) can enforce")
    strict: bool | None = Field(None, description="the schema is always enforced")


class ResponseFormatText(StrictModel):
    type: Literal["text"]


class ResponseFormatJsonObject(StrictModel):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(StrictModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN,
                      description="letters, digits, _ and -; at most 64 characters")
    description: str | None = Field(None, max_length=100_000)
    parameters: dict[str, Any] | None = Field(
        None, description="the arguments' JSON schema (null: no arguments)")
    strict: bool | None = Field(None, description="forced calls always follow the schema")


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str = Field(max_length=64)


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


# tool_choice "required" or a named function needs tools (what the schema can say of it)
_FORCED_CALL_NEEDS_TOOLS = {
    "if": {"required": ["tool_choice"],
           "properties": {"tool_choice": {"anyOf": [{"const": "required"},
                                                    {"type": "object"}]}}},
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
}


class ChatCompletionRequest(_CommonSampling):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra=_FORCED_CALL_NEEDS_TOOLS)

    messages: list[ChatMessage] = Field(
        min_length=1, description="rendered with the model's chat template; the conversation "
        "plus max_completion_tokens must fit the context length")
    max_tokens: _new_tokens(1) | None = Field(
        None, description="deprecated: max_completion_tokens (if both are set, they must agree)")
    max_completion_tokens: _new_tokens(1) | None = Field(
        None, description="null: the server's --default-max-tokens, else up to the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="only with logprobs=true")
    response_format: ResponseFormat | None = Field(
        None, description="json_object: the reply is a JSON object; json_schema: it validates "
        f"against the schema; {_ONE_CONSTRAINT}")
    tools: list[Tool] | None = Field(
        None, max_length=MAX_TOOLS, description="functions the model may call; they go "
        "through the chat template, so a model whose template has no tool support needs "
        'tool_choice "none"')
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"none": no call; "auto" (the default with tools): the model may '
        'call; "required" or a named function: the reply is a call, its arguments valid under '
        "the function's parameters; the last two need tools and no response_format / guided_*"
        " field (a named function must be one of the tools)")
    parallel_tool_calls: bool | None = Field(
        None, description="false: at most one call per reply (default: any number)")
    functions: neutral_only(None, []) = None
    function_call: neutral_only(None, "none", "auto") = None
    store: neutral_only(None, False) = None
    metadata: dict[str, str] | None = None
    service_tier: neutral_only(None, "auto", "default") = None
    reasoning_effort: neutral_only(None) = None
    modalities: neutral_only(None, ["text"]) = None
    audio: neutral_only(None) = None
    web_search_options: neutral_only(None) = None
    verbosity: neutral_only(None) = None
    prompt_cache_key: str | None = Field(None, max_length=1000)
    safety_identifier: str | None = Field(None, max_length=1000)


class ChatLogprobTop(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop] = []


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None
    refusal: list[ChatLogprobEntry] | None = None


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


# -- /v1/models -------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "soarllm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- errors ---------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
