"""POST /v1/completions: prompts (text, batches, token ids, fill-in-the-middle), echo, logprobs,
n, stop, seed; a JSON response or a stream of ``text_completion`` chunks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from soarllm.errors import InvalidRequestError, SoarError
from soarllm.outputs import CompletionOutput, RequestOutput
from soarllm.serve.generation import (
    PromptInput,
    TrackedRequest,
    close_all,
    interleave,
    new_request_id,
    submit,
)
from soarllm.serve.logprobs import CompletionLogprobsBuilder, visible
from soarllm.serve.prompts import completion_inputs, prediction_input
from soarllm.serve.protocol_openai import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    prediction_usage,
    usage,
)
from soarllm.serve.sampling import completion_params
from soarllm.serve.state import ServerState
from soarllm.serve.streaming import (
    DONE,
    SSEResponse,
    sse_event,
    stream_error_payload,
    until_disconnect,
)

logger = logging.getLogger(__name__)

MAX_CHOICES = 512  # prompts x n in one request


def check_stream_options(stream: bool, stream_options: Any) -> None:
    if stream_options is not None and not stream:
        raise InvalidRequestError("stream_options is only allowed with stream=true",
                                  param="stream_options")


async def create_completion(state: ServerState, req: CompletionRequest,
                            raw: Request) -> Response | CompletionResponse:
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequestError(
            f"best_of must be null or equal to n (got best_of={req.best_of}, n={req.n}): this "
            "server returns every completion it generates, with no best-of selection",
            param="best_of",
        )
    model = state.check_model(req.model)
    check_stream_options(req.stream, req.stream_options)
    echo_only = req.max_tokens == 0
    if echo_only and not req.echo:
        raise InvalidRequestError(
            "max_tokens must be at least 1 (0 is allowed only with echo=true, to score a prompt)",
            param="max_tokens",
        )
    prompts = await completion_inputs(state, req.prompt, req.suffix, model)
    if len(prompts) * req.n > MAX_CHOICES:
        raise InvalidRequestError(
            f"{len(prompts)} prompts x n={req.n} asks for {len(prompts) * req.n} completions; "
            f"at most {MAX_CHOICES} per request", param="n",
        )
    params = completion_params(req, 1 if echo_only else req.max_tokens)
    if req.prediction is not None and req.prediction.text and not echo_only:
        params.prediction = await prediction_input(state, req.prediction.text)
    request_id = new_request_id("cmpl")
    tracked = await submit(state, request_id, prompts, params)
    view = _CompletionView(state, req, model, request_id, prompts, echo_only)
    if req.stream:
        return SSEResponse(view.stream(tracked), on_close=lambda: close_all(tracked))
    try:
        finals = await until_disconnect(raw, asyncio.gather(*(t.collect() for t in tracked)))
    finally:
        close_all(tracked)
    return view.response(finals)


class _CompletionView:
    """Formats engine outputs of one completions request, whole or as chunks."""

    def __init__(self, state: ServerState, req: CompletionRequest, model: str, request_id: str,
                 prompts: list[PromptInput], echo_only: bool):
        self.tok = state.tokenizer
        self.req = req
        self.model = model
        self.id = request_id
        self.created = int(time.time())
        self.prompts = prompts
        self.echo_only = echo_only
        self.skip_special = req.skip_special_tokens is not False

    # -- non-streaming ---------------------------------------------------------------------------

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        req, choices = self.req, []
        completion_tokens = cached = 0
        for i, (prompt, final) in enumerate(zip(self.prompts, finals)):
            cached += final.num_cached_tokens
            for c in final.outputs:
                text, lp = "", None
                builder = CompletionLogprobsBuilder(self.tok, req.logprobs or 0)
                if req.echo:
                    text = prompt.text
                    if req.logprobs is not None:
                        lp = builder.build(prompt.token_ids, _prompt_lps(final, prompt))
                if not self.echo_only:
                    text += c.text
                    completion_tokens += len(c.token_ids)
                    if req.logprobs is not None:
                        gen = builder.build(*visible(self.tok, c.token_ids, c.logprobs or [],
                                                     self.skip_special))
                        lp = gen if lp is None else {k: lp[k] + gen[k] for k in lp}
                choices.append(CompletionChoice(
                    index=i * req.n + c.index, text=text,
                    logprobs=CompletionLogprobs(**lp) if lp is not None else None,
                    finish_reason=self._reason(c.finish_reason),
                ))
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=self._usage(completion_tokens, cached,
                              [c for final in finals for c in final.outputs]),
        )

    def _reason(self, reason: str | None) -> str | None:
        if self.echo_only:
            return "length"
        return "length" if reason == "length" else ("stop" if reason else None)

    def _usage(self, completion_tokens: int, cached: int = 0,
               outputs: Iterable[CompletionOutput] = ()) -> Usage:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        return usage(prompt_tokens, completion_tokens, cached,
                     prediction_usage(outputs) if self.req.prediction is not None else None)

    # -- streaming -----------------------------------------------------------------------------

    async def stream(self, tracked: list[TrackedRequest]) -> AsyncIterator[bytes]:
        req = self.req
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        builders: dict[int, CompletionLogprobsBuilder] = {}
        started: set[int] = set()
        finished: set[int] = set()
        completion_tokens = 0
        cached: dict[int, int] = {}
        latest: dict[int, CompletionOutput] = {}
        try:
            async for i, out in interleave(tracked):
                cached[i] = out.num_cached_tokens
                for c in out.outputs:
                    idx = i * req.n + c.index
                    if idx in finished:
                        continue
                    builder = builders.setdefault(
                        idx, CompletionLogprobsBuilder(self.tok, req.logprobs or 0))
                    text, lp = "", None
                    if idx not in started and req.echo:
                        text = self.prompts[i].text
                        if req.logprobs is not None:
                            lp = builder.build(self.prompts[i].token_ids,
                                               _prompt_lps(out, self.prompts[i]))
                    started.add(idx)
                    latest[idx] = c
                    if not self.echo_only:
                        text += c.delta_text
                        completion_tokens += len(c.delta_token_ids)
                        if req.logprobs is not None and c.delta_token_ids:
                            gen = builder.build(*visible(
                                self.tok, c.delta_token_ids, c.delta_logprobs or [],
                                self.skip_special))
                            lp = gen if lp is None else {k: lp[k] + gen[k] for k in lp}
                    reason = self._reason(c.finish_reason) if c.finish_reason else None
                    if reason:
                        finished.add(idx)
                    if not text and lp is None and reason is None:
                        continue
                    if req.logprobs is not None and lp is None:
                        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                              "text_offset": []}
                    chunk: dict[str, Any] = {
                        "id": self.id, "object": "text_completion", "created": self.created,
                        "model": self.model,
                        "choices": [{"index": idx, "text": text, "logprobs": lp,
                                     "finish_reason": reason}],
                    }
                    if include_usage:
                        chunk["usage"] = None
                    yield sse_event(chunk)
            if include_usage:
                yield sse_event({
                    "id": self.id, "object": "text_completion", "created": self.created,
                    "model": self.model, "choices": [],
                    "usage": self._usage(completion_tokens, sum(cached.values()),
                                         latest.values()).model_dump(),
                })
            yield DONE
        except SoarError as e:
            yield sse_event(stream_error_payload(e))
            yield DONE
        except Exception as e:  # a bug: end this stream only
            logger.exception("completion stream %s failed", self.id)
            yield sse_event({"error": {"message": f"internal server error ({type(e).__name__})",
                                       "type": "internal_error", "param": None, "code": 500}})
            yield DONE
        finally:
            close_all(tracked)


def _prompt_lps(output: RequestOutput, prompt: PromptInput) -> list[Any]:
    lps = output.prompt_logprobs
    if lps is None:
        return [None] * len(prompt.token_ids)
    return list(lps)
