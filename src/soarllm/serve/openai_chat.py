"""POST /v1/chat/completions: messages (and tools) through the model's chat template; a JSON
response or a stream of ``chat.completion.chunk`` events. With tools, the reply goes through the
model's tool-call parser (serve/tool_parsers): calls become ``message.tool_calls`` (streamed as
tool-call deltas) and the finish reason "tool_calls"."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from soarllm import __version__
from soarllm.errors import SoarError
from soarllm.outputs import CompletionOutput, RequestOutput
from soarllm.serve.generation import (
    PromptInput,
    TrackedRequest,
    close_all,
    interleave,
    new_request_id,
    submit,
)
from soarllm.serve.logprobs import chat_logprobs, visible
from soarllm.serve.openai_completions import check_stream_options
from soarllm.serve.prompts import chat_input, prediction_input
from soarllm.serve.protocol_openai import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ResponseToolCall,
    Usage,
    prediction_usage,
    usage,
)
from soarllm.serve.sampling import chat_params
from soarllm.serve.state import ServerState
from soarllm.serve.streaming import (
    DONE,
    SSEResponse,
    sse_event,
    stream_error_payload,
    until_disconnect,
)
from soarllm.serve.tool_parsers.request import ToolRequest, tool_request
from soarllm.serve.tool_parsers.stream import ToolCallStream

logger = logging.getLogger(__name__)

SYSTEM_FINGERPRINT = f"soarllm-{__version__}"


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest,
                                 raw: Request) -> Response | ChatCompletionResponse:
    model = state.check_model(req.model)
    check_stream_options(req.stream, req.stream_options)
    tools = tool_request(req, state.tokenizer, state.config.tool_call_parser, model)
    prompt = await chat_input(state, req.messages, tools.tools if tools is not None else None)
    params = chat_params(req, default_max_tokens=state.config.default_max_tokens,
                         room=state.max_model_len - len(prompt.token_ids), tools=tools)
    if req.prediction is not None and req.prediction.text:
        params.prediction = await prediction_input(state, req.prediction.text)
    request_id = new_request_id("chatcmpl")
    tracked = await submit(state, request_id, [prompt], params)
    view = _ChatView(state, req, model, request_id, prompt, tools)
    if req.stream:
        return SSEResponse(view.stream(tracked), on_close=lambda: close_all(tracked))
    try:
        final = await until_disconnect(raw, tracked[0].collect())
    finally:
        close_all(tracked)
    return view.response(final)


def _reason(reason: str | None, called: bool = False) -> str | None:
    if reason is None:
        return None
    if reason == "length":
        return "length"
    return "tool_calls" if called else "stop"


class _ChatView:
    def __init__(self, state: ServerState, req: ChatCompletionRequest, model: str,
                 request_id: str, prompt: PromptInput, tools: ToolRequest | None = None):
        self.tok = state.tokenizer
        self.req = req
        self.model = model
        self.id = request_id
        self.created = int(time.time())
        self.prompt = prompt
        self.k = req.top_logprobs or 0
        self.skip_special = req.skip_special_tokens is not False
        self.tools = tools

    def _usage(self, completion_tokens: int, cached: int = 0,
               outputs: Iterable[CompletionOutput] = ()) -> Usage:
        return usage(len(self.prompt.token_ids), completion_tokens, cached,
                     prediction_usage(outputs) if self.req.prediction is not None else None)

    def response(self, final: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for c in final.outputs:
            logprobs = None
            if self.req.logprobs:
                logprobs = ChatChoiceLogprobs(content=chat_logprobs(
                    self.tok, *visible(self.tok, c.token_ids, c.logprobs or [],
                                       self.skip_special), self.k))
            message = ChatResponseMessage(content=c.text)
            called = False
            if self.tools is not None:
                parsed = self.tools.parser.parse(c.text, self.tools.max_calls)
                called = bool(parsed.tool_calls)
                message = ChatResponseMessage(
                    content=parsed.content,
                    tool_calls=[ResponseToolCall.model_validate(t.to_openai())
                                for t in parsed.tool_calls] or None)
            choices.append(ChatChoice(
                index=c.index, message=message, logprobs=logprobs,
                finish_reason=_reason(c.finish_reason, called),
            ))
        used = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model,
            system_fingerprint=SYSTEM_FINGERPRINT, choices=choices,
            usage=self._usage(used, final.num_cached_tokens, final.outputs),
        )

    def _chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices,
        }
        if include_usage:
            chunk["usage"] = None
        return sse_event(chunk)

    async def stream(self, tracked: list[TrackedRequest]) -> AsyncIterator[bytes]:
        req = self.req
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        finished: set[int] = set()
        completion_tokens = cached = 0
        latest: dict[int, CompletionOutput] = {}
        parsers = {} if self.tools is None else {
            i: self.tools.parser.stream(self.tools.max_calls) for i in range(req.n)}
        try:
            # the role comes first, once per choice, before any token is computed
            yield self._chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(req.n)], include_usage)
            async for _, out in interleave(tracked):
                cached = out.num_cached_tokens
                choices = []
                for c in out.outputs:
                    if c.index in finished:
                        continue
                    completion_tokens += len(c.delta_token_ids)
                    latest[c.index] = c
                    if c.finish_reason is not None:
                        finished.add(c.index)
                    if not c.delta_text and not c.delta_token_ids and c.finish_reason is None:
                        continue
                    logprobs = None
                    if req.logprobs:
                        logprobs = {"content": chat_logprobs(self.tok, *visible(
                            self.tok, c.delta_token_ids, c.delta_logprobs or [],
                            self.skip_special), self.k)}
                    parser = parsers.get(c.index)
                    if parser is None:
                        deltas = [{"content": c.delta_text}] if c.delta_text else []
                        reason = _reason(c.finish_reason)
                    else:
                        deltas = _tool_deltas(parser, c.delta_text, c.finish_reason is not None)
                        reason = _reason(c.finish_reason, parser.called)
                    for delta in deltas[:-1]:  # a call's first delta and its arguments: apart
                        yield self._chunk([{"index": c.index, "delta": delta, "logprobs": None,
                                            "finish_reason": None}], include_usage)
                    choices.append({"index": c.index, "delta": deltas[-1] if deltas else {},
                                    "logprobs": logprobs, "finish_reason": reason})
                if choices:
                    yield self._chunk(choices, include_usage)
            if include_usage:
                yield sse_event({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [],
                    "usage": self._usage(completion_tokens, cached,
                                         latest.values()).model_dump(),
                })
            yield DONE
        except SoarError as e:
            yield sse_event(stream_error_payload(e))
            yield DONE
        except Exception as e:  # a bug: end this stream only
            logger.exception("chat stream %s failed", self.id)
            yield sse_event({"error": {"message": f"internal server error ({type(e).__name__})",
                                       "type": "internal_error", "param": None, "code": 500}})
            yield DONE
        finally:
            close_all(tracked)



def _tool_deltas(parser: ToolCallStream, text: str, finished: bool) -> list[dict[str, Any]]:
    """OpenAI deltas of the next piece of a reply: content, a call's first delta (index, id,
    type, name, arguments ""), argument pieces; in order."""
    events = parser.feed(text) if text else []
    if finished:
        events += parser.finish()
    deltas: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, str):
            deltas.append({"content": e})
        else:
            deltas.append({"tool_calls": [e.to_openai()]})
    return deltas
