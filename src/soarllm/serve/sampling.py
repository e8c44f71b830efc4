"""API request fields -> SamplingParams, for the OpenAI and TGI routes (a forced tool call's
grammar included)."""

from __future__ import annotations

from typing import Any

from soarllm.errors import InvalidRequestError
from soarllm.sampling_params import SamplingParams, StructuredOutputParams
from soarllm.serve.protocol_openai import ChatCompletionRequest, CompletionRequest
from soarllm.serve.protocol_tgi import DEFAULT_MAX_NEW_TOKENS, TGIParameters
from soarllm.serve.tool_parsers.request import ToolRequest
from soarllm.structured_output import check_structured_output

_SEED_MOD = 2**63  # engines seed torch generators with non-negative 63-bit ints


def _extensions(req: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for name in ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
                 "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens",
                 "num_speculative_tokens"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    return kw


def structured_outputs(req: CompletionRequest | ChatCompletionRequest
                       ) -> StructuredOutputParams | None:
    """response_format (chat) or one of vLLM's guided_* fields -> StructuredOutputParams, checked
    (tokenizer-free) to be enforceable; a 400 naming the field otherwise."""
    found: list[tuple[str, StructuredOutputParams]] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", StructuredOutputParams(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_
        found.append(("response_format", StructuredOutputParams(json=schema) if schema is not None
                      else StructuredOutputParams(json_object=True)))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                      ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            found.append((name, StructuredOutputParams(**{key: value})))
    if not found:
        return None
    if len(found) > 1:
        raise InvalidRequestError(
            "send only one of response_format, guided_json, guided_regex, guided_choice and "
            f"guided_grammar; got {', '.join(name for name, _ in found)}", param=found[1][0])
    name, params = found[0]
    check_structured_output(params, param=name)
    return params


def _common(req: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    kw = _extensions(req)
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # only the most likely token is left: greedy
        temperature, top_p = 0.0, 1.0
    kw.update(
        n=req.n,
        temperature=temperature,
        top_p=top_p,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=None if req.seed is None else req.seed % _SEED_MOD,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        structured_outputs=structured_outputs(req),
    )
    return kw  # a `prediction` is tokenized by the route, on the tokenizer pool


def build(kw: dict[str, Any], rename: dict[str, str] | None = None) -> SamplingParams:
    """SamplingParams(**kw); its validation errors name the API's field, not the engine's."""
    try:
        return SamplingParams(**kw)
    except InvalidRequestError as e:
        param = (rename or {}).get(e.param or "", e.param)
        message = e.message
        if param and e.param and param != e.param:
            message = message.replace(e.param, param)
        raise InvalidRequestError(message, param=param) from None


def completion_params(req: CompletionRequest, max_tokens: int | None) -> SamplingParams:
    kw = _common(req)
    kw["max_tokens"] = max_tokens
    if req.logprobs is not None:
        kw["logprobs"] = req.logprobs
        if req.echo:
            kw["prompt_logprobs"] = req.logprobs
    return build(kw)


def chat_params(req: ChatCompletionRequest, default_max_tokens: int | None = None,
                room: int | None = None, tools: ToolRequest | None = None) -> SamplingParams:
    """``default_max_tokens`` (the server's --default-max-tokens) applies when the request sets
    neither max_tokens nor max_completion_tokens, capped to the ``room`` the prompt leaves.
    ``tools`` (tool_parsers/request.py): a forced call's grammar becomes the request's
    structured output, and a parser whose markers are special tokens keeps them in the text."""
    kw = _common(req)
    if tools is not None:
        if tools.grammar is not None:
            if kw["structured_outputs"] is not None:
                raise InvalidRequestError(
                    "send either a forced tool_choice (\"required\" or a named function) or "
                    "response_format / guided_*, not both: the reply cannot be a call and "
                    "follow another format", param="tool_choice")
            kw["structured_outputs"] = tools.grammar
        if tools.parser.needs_special_tokens and req.skip_special_tokens is None:
            kw["skip_special_tokens"] = False
    if req.max_completion_tokens is not None and req.max_tokens is not None \
            and req.max_completion_tokens != req.max_tokens:
        raise InvalidRequestError(
            "max_tokens and max_completion_tokens disagree; send only max_completion_tokens",
            param="max_tokens",
        )
    kw["max_tokens"] = req.max_completion_tokens or req.max_tokens
    if kw["max_tokens"] is None and default_max_tokens is not None:
        kw["max_tokens"] = default_max_tokens if room is None or room < 1 \
            else min(default_max_tokens, room)
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    if req.logprobs:
        kw["logprobs"] = req.top_logprobs or 0
    return build(kw, rename={"max_tokens": "max_completion_tokens", "logprobs": "top_logprobs"})


def tgi_params(p: TGIParameters, room: int | None = None) -> SamplingParams:
    """TGI's rule: sample when do_sample or any sampling knob is set, else greedy. Without
    max_new_tokens, DEFAULT_MAX_NEW_TOKENS capped to the ``room`` the prompt leaves."""
    sampling = p.do_sample or any(
        v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p)
    )
    kw: dict[str, Any] = dict(
        temperature=(p.temperature if p.temperature is not None else 1.0) if sampling else 0.0,
        top_k=p.top_k or 0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=None if p.seed is None else p.seed % _SEED_MOD,
        max_tokens=p.max_new_tokens or (DEFAULT_MAX_NEW_TOKENS if room is None or room < 1
                                        else min(DEFAULT_MAX_NEW_TOKENS, room)),
        stop=list(p.stop),
    )
    if p.top_n_tokens is not None or p.details:
        kw["logprobs"] = p.top_n_tokens or 0
    if p.decoder_input_details:
        kw["prompt_logprobs"] = p.top_n_tokens or 0
    return build(kw, rename={"max_tokens": "max_new_tokens", "logprobs": "top_n_tokens"})
