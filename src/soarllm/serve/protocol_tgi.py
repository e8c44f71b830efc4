"""Text Generation Inference (TGI) request and response models.

The request accepts every field TGI's clients send (the ``text-generation`` client posts all of
them, most as null); the ones soarllm cannot honour are refused by ``unsupported()`` when set.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_NEW_TOKENS = 100

TGIFinishReason = Literal["length", "eos_token", "stop_sequence"]


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    return_full_text: bool | None = False
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    temperature: float | None = Field(None, gt=0.0, le=100.0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0.0, lt=1.0)
    truncate: int | None = Field(None, gt=0)
    typical_p: float | None = Field(None, gt=0.0, lt=1.0)
    best_of: int | None = Field(None, gt=0)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = Field(None, ge=0, le=20)
    grammar: Any = None
    adapter_id: str | None = None

    def unsupported(self) -> list[str]:
        bad = []
        if self.typical_p is not None:
            bad.append("typical_p")
        if self.best_of not in (None, 1):
            bad.append("best_of")
        if self.watermark:
            bad.append("watermark")
        if self.grammar is not None:
            bad.append("grammar")
        if self.adapter_id:
            bad.append("adapter_id")
        return bad


class TGIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str = Field(description="the prompt")
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False
    add_special_tokens: bool = True


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
