"""Text Generation Inference (TGI) request and response models.

The request accepts every field TGI's clients send (the ``text-generation`` client posts all of
them, most as null); the ones soarllm cannot honour accept only their neutral value
(``neutral_only``), so the published schema says what the server enforces. Sampling bounds come
from soarllm/sampling_params.py, lengths from the served model (serve/openapi.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from soarllm.sampling_params import (
    MAX_ABS_PENALTY,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
)
from soarllm.serve.request_fields import (
    NEW_TOKENS,
    NonEmptyPromptText,
    int_field,
    neutral_only,
    served_limit,
)

DEFAULT_MAX_NEW_TOKENS = 100

TGIFinishReason = Literal["length", "eos_token", "stop_sequence"]


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    do_sample: bool = False
    max_new_tokens: int | None = Field(
        None, ge=1, json_schema_extra=served_limit(NEW_TOKENS),
        description=f"null: {DEFAULT_MAX_NEW_TOKENS}; inputs plus max_new_tokens must fit the "
        "context length")
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    return_full_text: bool | None = False
    seed: int | None = int_field(None, ge=0, le=2**64 - 1)
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list,
                                                           max_length=MAX_STOP_STRINGS)
    temperature: float | None = Field(None, gt=0.0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(None, gt=0, le=MAX_TOP_K)
    top_p: float | None = Field(None, gt=0.0, lt=1.0)
    truncate: int | None = Field(None, gt=0)
    typical_p: neutral_only(None) = None
    best_of: neutral_only(None, 1) = None
    watermark: neutral_only(False) = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    grammar: neutral_only(None) = None
    adapter_id: neutral_only(None, "") = None


class TGIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: NonEmptyPromptText = Field(description="the prompt")
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False
    add_special_tokens: bool = True


def _not_streamed(stream: bool) -> bool:
    if stream:
        raise PydanticCustomError(
            "stream_route", "stream=true is not supported on /generate; use /generate_stream")
    return stream


class TGIGenerateRequest(TGIRequest):
    """POST /generate: a whole response, never a stream."""

    stream: Annotated[bool, AfterValidator(_not_streamed),
                      Field(json_schema_extra={"const": False})] = False


class TGIInputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class TGIToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class TGIDetails(BaseModel):
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[TGIInputToken] = []
    tokens: list[TGIToken] = []
    top_tokens: list[list[TGIToken]] | None = None
    best_of_sequences: list[Any] | None = None


class TGIResponse(BaseModel):
    generated_text: str
    details: TGIDetails | None = None


class TGIStreamDetails(BaseModel):
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int | None = None


class TGIStreamResponse(BaseModel):
    index: int
    token: TGIToken
    top_tokens: list[TGIToken] | None = None
    generated_text: str | None = None
    details: TGIStreamDetails | None = None


class TGIInfo(BaseModel):
    model_id: str
    model_dtype: str | None = None
    model_device_type: str | None = None
    max_input_tokens: int
    max_total_tokens: int
    max_best_of: int = 1
    max_stop_sequences: int = 16
    version: str
    router: str = "soarllm"
