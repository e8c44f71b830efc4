"""Text Generation Inference routes: POST /generate, POST /generate_stream and POST / (TGI's
compatibility route that the ``text-generation`` client calls), with TGI's shapes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from soarllm.errors import InvalidRequestError, SoarError
from soarllm.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from soarllm.serve.generation import PromptInput, TrackedRequest, close_all, new_request_id, submit
from soarllm.serve.logprobs import token_text
from soarllm.serve.prompts import text_input
from soarllm.serve.protocol_tgi import (
    TGIDetails,
    TGIInputToken,
    TGIRequest,
    TGIResponse,
    TGIToken,
)
from soarllm.serve.sampling import tgi_params
from soarllm.serve.state import ServerState
from soarllm.serve.streaming import SSEResponse, sse_event, stream_error_payload, until_disconnect

logger = logging.getLogger(__name__)


def finish_reason(c: CompletionOutput) -> str:
    if c.finish_reason == "length":
        return "length"
    if isinstance(c.stop_reason, str) or isinstance(c.stop_reason, int):
        return "stop_sequence"
    return "eos_token"


async def _start(state: ServerState, req: TGIRequest, stream: bool) -> tuple[
        PromptInput, TrackedRequest, _TGIView]:
    p = req.parameters
    if not req.inputs:
        raise InvalidRequestError("`inputs` cannot be empty", param="inputs")
    ids = await text_input(state, req.inputs, "inputs", req.add_special_tokens)
    if p.truncate is not None:
        ids = ids[-p.truncate:]
    prompt = PromptInput(ids, req.inputs)
    params = tgi_params(p, room=state.max_model_len - len(ids))
    tracked = await submit(state, new_request_id("tgi"), [prompt], params, coalesce=not stream)
    return prompt, tracked[0], _TGIView(state, req, prompt, params.seed)


def tgi_json(resp: TGIResponse) -> dict[str, Any]:
    """TGI's JSON: no ``details`` unless asked for; optional lists left out when empty."""
    out = resp.model_dump()
    if out["details"] is None:
        del out["details"]
    else:
        for key in ("top_tokens", "best_of_sequences"):
            if not out["details"][key]:
                del out["details"][key]
    return out


async def generate(state: ServerState, req: TGIRequest, raw: Request) -> dict[str, Any]:
    """A whole response (POST /generate refuses stream=true in its request model)."""
    _, tracked, view = await _start(state, req, stream=False)
    try:
        final = await until_disconnect(raw, tracked.collect())
    finally:
        tracked.close()
    return tgi_json(view.response(final))


async def generate_stream(state: ServerState, req: TGIRequest) -> Response:
    _, tracked, view = await _start(state, req, stream=True)
    return SSEResponse(view.stream(tracked), on_close=lambda: close_all([tracked]))


class _TGIView:
    def __init__(self, state: ServerState, req: TGIRequest, prompt: PromptInput,
                 seed: int | None):
        self.tok = state.tokenizer
        self.req = req
        self.p = req.parameters
        self.prompt = prompt
        sampling = self.p.do_sample or any(
            v is not None for v in (self.p.temperature, self.p.top_k, self.p.top_p))
        self.seed = seed if sampling else None
        self.special = set(getattr(self.tok, "all_special_ids", []) or [])

    def _token(self, tid: int, entry: TokenLogprobs | None, text: str | None = None) -> TGIToken:
        lp = entry.get(tid) if entry else None
        return TGIToken(
            id=tid, text=text if text is not None else token_text(self.tok, tid, entry),
            logprob=lp.logprob if lp else None, special=tid in self.special,
        )

    def _top(self, entry: TokenLogprobs | None) -> list[TGIToken]:
        n = self.p.top_n_tokens or 0
        if not entry or not n:
            return []
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
        return [self._token(t, entry) for t, lp in ranked if lp.rank <= n]

    def _full_text(self, text: str) -> str:
        return self.prompt.text + text if self.p.return_full_text else text

    def response(self, final: RequestOutput) -> TGIResponse:
        c = final.outputs[0]
        if not self.p.details:
            return TGIResponse(generated_text=self._full_text(c.text))
        lps = c.logprobs or [None] * len(c.token_ids)
        prefill: list[TGIInputToken] = []
        if self.p.decoder_input_details:
            plps = final.prompt_logprobs or [None] * len(self.prompt.token_ids)
            for tid, entry in zip(self.prompt.token_ids, plps):
                lp = entry.get(tid) if entry else None
                prefill.append(TGIInputToken(id=tid, text=token_text(self.tok, tid, entry),
                                             logprob=lp.logprob if lp else None))
        return TGIResponse(
            generated_text=self._full_text(c.text),
            details=TGIDetails(
                finish_reason=finish_reason(c),
                generated_tokens=len(c.token_ids),
                seed=self.seed,
                prefill=prefill,
                tokens=[self._token(t, e) for t, e in zip(c.token_ids, lps)],
                top_tokens=[self._top(e) for e in lps] if self.p.top_n_tokens else None,
            ),
        )

    def _event(self, index: int, token: TGIToken, top: list[TGIToken],
               generated_text: str | None, details: dict[str, Any] | None) -> bytes:
        return sse_event({
            "index": index,
            "token": token.model_dump(),
            "top_tokens": [t.model_dump() for t in top] if self.p.top_n_tokens else None,
            "generated_text": generated_text,
            "details": details,
        })

    async def stream(self, tracked: TrackedRequest) -> AsyncIterator[bytes]:
        index = 0
        try:
            async for out in tracked:
                c = out.outputs[0]
                ids = c.delta_token_ids
                lps = c.delta_logprobs or [None] * len(ids)
                for k, (tid, entry) in enumerate(zip(ids, lps)):
                    last = k == len(ids) - 1
                    text = c.delta_text if len(ids) == 1 else None
                    done = last and c.finish_reason is not None
                    details = None
                    if done:
                        details = {"finish_reason": finish_reason(c),
                                   "generated_tokens": len(c.token_ids), "seed": self.seed,
                                   "input_length": len(self.prompt.token_ids)}
                    index += 1
                    yield self._event(index, self._token(tid, entry, text), self._top(entry),
                                      self._full_text(c.text) if done else None, details)
        except SoarError as e:
            yield sse_event(stream_error_payload(e, tgi=True))
        except Exception as e:  # a bug: end this stream only
            logger.exception("TGI stream failed")
            yield sse_event({"error": f"internal server error ({type(e).__name__})",
                             "error_type": "generation"})
        finally:
            tracked.close()
