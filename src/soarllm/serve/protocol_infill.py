"""Request and response models of POST /infill, llama.cpp server's code-infill endpoint.

The fields are llama.cpp's (tools/server/README.md): the code around the cursor
(``input_prefix``, ``input_suffix``), other files for context (``input_extra``), the text just
before the cursor (``prompt``), and the ``/completion`` sampling options with llama.cpp's
defaults. Options of llama.cpp that this server does not implement are not declared, so a request
that sends one is refused with a 400 naming it (StrictModel).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from soarllm.sampling_params import (
    MAX_ABS_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
)
from soarllm.serve.request_fields import NEW_TOKENS, PromptText, StrictModel, served_limit

MAX_EXTRA_CHUNKS = 1024

StopType = Literal["none", "eos", "limit", "word"]


class InputExtraChunk(StrictModel):
    """Another file of the project, given as context before the code being completed."""

    filename: str = "tmp"
    text: str = ""


class InfillRequest(StrictModel):
    model: str | None = None
    input_prefix: str = Field("", description="the code before the cursor (its start is "
                              "dropped when it does not fit the context)")
    input_suffix: str = Field("", description="the code after the cursor (its end is dropped "
                              "when it does not fit the context)")
    input_extra: list[InputExtraChunk] = Field(
        default_factory=list, max_length=MAX_EXTRA_CHUNKS,
        description="other files, placed before the code being completed; what does not fit "
        "the context after prefix and suffix is dropped, oldest first")
    prompt: PromptText = Field(
        "", description="text typed just before the cursor, kept whole after input_prefix")
    n_predict: Annotated[int, Field(ge=1)] | Literal[-1] = Field(
        -1, json_schema_extra=served_limit(NEW_TOKENS),
        description="tokens to generate at most; -1: until the end of the middle or of the "
        "context. The prompt's core (prompt plus FIM tokens) and n_predict must fit the "
        "maximum context length")
    temperature: float = Field(0.8, ge=0.0, le=MAX_TEMPERATURE, description="0: greedy")
    top_k: int = Field(40, ge=0, le=MAX_TOP_K, description="0: all tokens")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="1.0: all tokens")
    min_p: float = Field(0.05, ge=0.0, le=1.0, description="0.0: all tokens")
    repeat_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY)
    presence_penalty: float = Field(0.0, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)
    seed: int = Field(-1, ge=-1, le=2**32 - 1, description="-1: a random seed")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS)
    ignore_eos: bool = False
    stream: bool = False
    return_tokens: bool = Field(False, description="list the generated token ids in `tokens`")
    cache_prompt: bool = Field(True, description="accepted for compatibility: this server "
                               "always reuses cached prompt prefixes (the output is the same)")


class InfillTimings(BaseModel):
    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float | None
    predicted_per_second: float | None


class InfillResponse(BaseModel):
    """A whole answer; with stream=true, the last event carries these fields too."""

    index: int = 0
    content: str
    tokens: list[int]
    stop: bool
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int
    prompt: str
    has_new_line: bool
    truncated: bool
    stop_type: StopType
    stopping_word: str
    timings: InfillTimings


class InfillStreamChunk(BaseModel):
    """One event of a stream: ``data: {"content": ..., "stop": false, ...}``."""

    index: int = 0
    content: str
    tokens: list[int]
    stop: bool
    tokens_predicted: int
    tokens_evaluated: int
