"""OpenAI API request and response models (the subset soarllm serves).

Requests are strict: a field of the wrong type is an error (no "5" for 5), and a field the model
does not declare is refused by name. Fields that OpenAI defines but this server cannot honour are
declared so the error can say so, and refused by ``unsupported()`` when they are set to anything
but their neutral value.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# int64, the range OpenAI documents for seeds
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingExtensions(StrictModel):
    """vLLM-style sampling fields that clients send through ``extra_body``."""

    top_k: int | None = Field(None, ge=-1, le=1_000_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0, le=1_000_000)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None


class _CommonSampling(SamplingExtensions):
    model: str | None = Field(None, max_length=1000, description="served model name")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=1000)
    logit_bias: dict[str, float] | None = None


# -- /v1/completions ----------------------------------------------------------------------------

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_CommonSampling):
    prompt: Prompt
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=128)

    def unsupported(self) -> list[str]:
        bad = []
        if self.logit_bias:
            bad.append("logit_bias")
        if self.best_of is not None and self.best_of != self.n:
            bad.append("best_of")
        return bad


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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


# -- /v1/chat/completions -------------------------------------------------------------------------


class TextContentPart(StrictModel):
    type: Literal["text"]
    text: str


class OtherContentPart(BaseModel):
    """Any non-text part (image_url, input_audio, file, ...): refused with a clear message."""

    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextContentPart | OtherContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None


class ResponseFormat(StrictModel):
    type: str
    json_schema: Any = None


class ChatCompletionRequest(_CommonSampling):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1, description="deprecated: max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    verbosity: str | None = None
    prompt_cache_key: str | None = Field(None, max_length=1000)
    safety_identifier: str | None = Field(None, max_length=1000)

    def unsupported(self) -> list[str]:
        bad = []
        if self.logit_bias:
            bad.append("logit_bias")
        if self.response_format is not None and self.response_format.type != "text":
            bad.append("response_format")
        if self.tools:
            bad.append("tools")
        if self.tool_choice not in (None, "none", "auto") or (
            self.tool_choice == "auto" and self.tools
        ):
            bad.append("tool_choice")
        for name in ("functions", "function_call", "audio", "prediction", "web_search_options",
                     "reasoning_effort", "verbosity"):
            if getattr(self, name):
                bad.append(name)
        if self.store:
            bad.append("store")
        if self.service_tier not in (None, "auto", "default"):
            bad.append("service_tier")
        if self.modalities is not None and self.modalities != ["text"]:
            bad.append("modalities")
        return bad


class ChatLogprobTop(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobEntry(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop] = []


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None
    refusal: list[ChatLogprobEntry] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


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
