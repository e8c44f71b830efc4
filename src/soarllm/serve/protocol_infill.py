"""Request and response models of POST /infill, llama.cpp server's code-infill endpoint.

The fields are llama.cpp's (tools/server/README.md): the code around the cursor
(``input_prefix``, ``input_suffix``), other files for context (``input_extra``), the text just
before the cursor (``prompt``), and the ``/completion`` sampling options with llama.cpp's
defaults, plus the options llama.cpp's editor plugins (llama.vim, llama.vscode) send on every
request: ``n_indent``, ``t_max_predict_ms``, ``t_max_prompt_ms``, ``samplers``,
``response_fields``, ``id_slot``. Options of llama.cpp that this server does not implement are
not declared, so a request that sends one is refused with a 400 naming it (StrictModel).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

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
    PromptText,
    StrictModel,
    served_limit,
)

MAX_EXTRA_CHUNKS = 1024
MAX_RESPONSE_FIELDS = 256
MAX_N_CMPL = 16
INT32_MAX = 2**31 - 1

# llama.cpp's sampler names (common/sampling.cpp): the canonical ones, their kebab-case and
# underscore-free spellings, and three aliases, mapped to the canonical name.
SAMPLER_NAMES = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                 "temperature", "infill", "adaptive_p")
SAMPLER_ALIASES = {
    **{n: n for n in SAMPLER_NAMES},
    **{n.replace("_", "-"): n for n in SAMPLER_NAMES if "_" in n},
    **{n.replace("_", ""): n for n in SAMPLER_NAMES if "_" in n},
    "nucleus": "top_p", "temp": "temperature", "typ": "typ_p",
}
SamplerName = Literal[tuple(SAMPLER_ALIASES)]  # type: ignore[valid-type]

StopType = Literal["none", "eos", "limit", "word"]


class InputExtraChunk(StrictModel):
    """Another file of the project, given as context before the code being completed."""

    filename: str = "tmp"
    text: str = ""
    time: list[int | float] | int | float | None = Field(
        None, description="accepted and ignored (llama.vim sends when it picked the chunk)")


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
    n_predict: Annotated[int, Field(ge=0)] | Literal[-1] = Field(
        -1, json_schema_extra=served_limit(NEW_TOKENS),
        description="tokens to generate at most; -1: until the end of the middle or of the "
        "context; 0: generate nothing, only compute the prompt so that its prefix is cached "
        "for the next request (llama.vim's warm-up request). The prompt's core (prompt plus "
        "FIM tokens) and n_predict must fit the maximum context length")
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
    # -- what llama.cpp's editor plugins send (llama.vim, llama.vscode) ----------------------
    id_slot: int = Field(-1, ge=-1, le=INT32_MAX, description="accepted and ignored: this "
                         "server has no slots (every request may reuse any cached prefix)")
    n_indent: int = Field(0, ge=0, le=INT32_MAX, description="minimum indentation (spaces and "
                          "tabs) of the generated lines after the first: once a line starts "
                          "with less and has other text, generation stops and the content is "
                          "cut where that line's text begins (stop_type \"limit\"); 0: off")
    t_max_predict_ms: int = Field(-1, ge=-1, le=INT32_MAX, description="once this many ms "
                                  "have passed since the first generated token, stop at the "
                                  "next token that contains a newline (stop_type \"limit\"); "
                                  "-1 or 0: no limit")
    t_max_prompt_ms: int = Field(-1, ge=-1, le=INT32_MAX, description="accepted and not "
                                 "enforced, as in llama.cpp's server (a TODO there)")
    samplers: list[SamplerName] | None = Field(  # type: ignore[valid-type]
        None, max_length=64, description="llama.cpp's sampler names; only the samplers listed "
        "are applied (a sampler left out is off: top_k 0, top_p 1, min_p 0, temperature 1, no "
        "penalties), always in this server's fixed order (penalties, top_k, top_p, min_p, "
        "temperature), whatever the list's order. dry, typ_p, top_n_sigma, xtc and adaptive_p "
        "are accepted and off (their options are not served: off at llama.cpp's defaults too); "
        "infill (llama.cpp's end-of-middle heuristic) is accepted and not applied. null: all")
    response_fields: list[str] = Field(
        default_factory=list, max_length=MAX_RESPONSE_FIELDS, description="return only these "
        "fields of the whole answer (or of a stream's last event); \"a/b\" takes field b of "
        "object a, returned under the key \"a/b\"; a field that does not exist is left out. "
        "[]: all fields")
    n_cmpl: int = Field(1, ge=1, le=MAX_N_CMPL, description="completions to generate from "
                        "the prompt; more than 1: the answer is a list of them (each with its "
                        "index), as llama.cpp returns it. With stream=true only 1")
    n_probs: int = Field(0, ge=0, le=MAX_LOGPROBS, description="for each generated token, "
                         "the probabilities of the n most likely tokens in "
                         "completion_probabilities (the model's own distribution, before "
                         "penalties and samplers); 0: none")


class TokenProbability(BaseModel):
    """A token and its log probability (llama.cpp's fields)."""

    id: int
    token: str = Field(description="the token's text (invalid UTF-8 replaced)")
    bytes: list[int] = Field(description="the token's raw bytes")
    logprob: float


class GeneratedTokenProbabilities(TokenProbability):
    """One generated token of ``completion_probabilities``."""

    top_logprobs: list[TokenProbability] = Field(
        description="the n_probs most likely tokens, most likely first")


class InfillTimings(BaseModel):
    """llama.cpp's timings: ``prompt_n`` counts the prompt tokens computed (``cache_n`` the ones
    found in the prefix cache)."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float | None
    prompt_per_second: float | None
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
    completion_probabilities: list[GeneratedTokenProbabilities] | None = Field(
        None, description="the chunk's tokens, only with n_probs > 0")
    tokens_cached: int
    prompt: str
    has_new_line: bool
    truncated: bool
    stop_type: StopType
    stopping_word: str
    timings: InfillTimings
    completion_probabilities: list[GeneratedTokenProbabilities] | None = Field(
        None, description="only with n_probs > 0 (and not on a stream's last event, whose "
        "chunks carried them)")


class InfillStreamChunk(BaseModel):
    """One event of a stream: ``data: {"content": ..., "stop": false, ...}``."""

    index: int = 0
    content: str
    tokens: list[int]
    stop: bool
    tokens_predicted: int
    tokens_evaluated: int
    completion_probabilities: list[GeneratedTokenProbabilities] | None = Field(
        None, description="the chunk's tokens, only with n_probs > 0")
