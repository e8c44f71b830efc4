"""POST /infill: code infilling compatible with llama.cpp server's endpoint, for editor plugins.

The prompt follows llama.cpp's layout. With the tokenizer's repo-level tokens (Qwen2.5-Coder's
``<|repo_name|>`` / ``<|file_sep|>``, StarCoder2's ``<reponame>`` / ``<file_sep>``) the other files
come first as a repository (the pattern of arXiv:2409.12186)::

    <REPO>myproject\\n<SEP>{filename}\\n{text}...<SEP>filename\\n
    <PRE>{input_prefix}{prompt}<SUF>{input_suffix}<MID>

without them each extra file is introduced by a plain ``--- snippet ---`` line. As in llama.cpp
(whose README places ``prompt`` after ``<MID>`` but whose code appends it to the prefix), ``prompt``
is the text just before the cursor and ends the prefix. A BOS token, for tokenizers that add one,
starts the prompt.

When it all does not fit the context (less the tokens reserved for the answer), the cursor's
surroundings win: the prefix keeps its end and the suffix its start (3:1 when both must be cut),
then the extra files fill what is left, keeping their end; ``truncated`` says so. The answer is
llama.cpp's shape (content, stop, stop_type, tokens_predicted, ...), whole or streamed as
``data: {"content": ...}`` events whose last one has ``stop: true`` and the totals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from soarllm.errors import ContextLengthError, InvalidRequestError, SoarError
from soarllm.model.tokenizer import fim_tokens
from soarllm.outputs import CompletionOutput, RequestOutput
from soarllm.serve.generation import PromptInput, TrackedRequest, close_all, new_request_id, submit
from soarllm.serve.prompts import encode
from soarllm.serve.protocol_infill import InfillRequest, InfillResponse, InfillTimings, StopType
from soarllm.serve.sampling import build
from soarllm.serve.state import ServerState
from soarllm.serve.streaming import SSEResponse, sse_event, stream_error_payload, until_disconnect

logger = logging.getLogger(__name__)

REPO_TOKENS = ("<|repo_name|>", "<reponame>")
FILE_SEP_TOKENS = ("<|file_sep|>", "<file_sep>", "<|file_separator|>")
PROJECT_NAME = "myproject"  # llama.cpp's names for the repository and the file being edited
CURRENT_FILE = "filename"
SNIPPET_SEPARATOR = "\n\n--- snippet ---\n\n"
# Tokens kept free for the answer when n_predict is -1 (at most a quarter of the context).
DEFAULT_RESERVE = 256


@dataclass
class InfillPrompt:
    token_ids: list[int]
    text: str  # the whole prompt, decoded (llama.cpp returns it as `prompt`)
    truncated: bool


def no_fim_error(model_name: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"/infill needs a model with fill-in-the-middle tokens, and {model_name!r} has none; "
        "serve a code model that has them, e.g. `soar serve qwen2.5-coder-0.5b-instruct`",
        param="model",
    )


def _token_id(tokenizer: Any, candidates: tuple[str, ...]) -> int | None:
    vocab = tokenizer.get_vocab()
    return next((vocab[t] for t in candidates if t in vocab), None)


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer starts its encodings with one, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    with_special = encode(tokenizer, "a", add_special_tokens=True)
    plain = encode(tokenizer, "a", add_special_tokens=False)
    if bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]:
        return [bos]
    return []


def infill_prompt(tokenizer: Any, req: InfillRequest, budget: int,
                  model_name: str) -> InfillPrompt:
    """The prompt's token ids, at most ``budget`` of them (blocking: run on a worker thread)."""
    fim = fim_tokens(tokenizer)
    if fim is None:
        raise no_fim_error(model_name)
    pre, suf, mid = tokenizer.convert_tokens_to_ids(list(fim))

    def enc(text: str) -> list[int]:
        return encode(tokenizer, text, add_special_tokens=False) if text else []

    repo, sep = _token_id(tokenizer, REPO_TOKENS), _token_id(tokenizer, FILE_SEP_TOKENS)
    extra: list[int] = []
    if repo is not None:
        extra += [repo] + enc(PROJECT_NAME + "\n")
    for chunk in req.input_extra:
        extra += [sep] + enc(chunk.filename + "\n") if sep is not None else enc(SNIPPET_SEPARATOR)
        extra += enc(chunk.text)
    if sep is not None:
        extra += [sep] + enc(CURRENT_FILE + "\n")
    prefix, suffix, typed = enc(req.input_prefix), enc(req.input_suffix), enc(req.prompt)
    bos = _bos(tokenizer)
    room = budget - (len(bos) + 3 + len(typed))
    if room < 0:
        raise ContextLengthError(
            f"the prompt ({len(typed)} tokens) and the 3 fill-in-the-middle tokens do not fit: "
            f"the maximum context length less the tokens reserved for the answer (n_predict) "
            f"leaves {budget} tokens for the prompt; shorten the prompt or lower n_predict",
            param="prompt",
        )
    n_prefix, n_suffix = len(prefix), len(suffix)
    if n_prefix + n_suffix > room:
        n_suffix = min(len(suffix), room // 4)
        n_prefix = min(len(prefix), room - n_suffix)
        n_suffix = min(len(suffix), room - n_prefix)
    n_extra = min(len(extra), room - n_prefix - n_suffix)
    ids = (bos + extra[len(extra) - n_extra:] + [pre] + prefix[len(prefix) - n_prefix:] + typed
           + [suf] + suffix[:n_suffix] + [mid])
    truncated = (n_prefix, n_suffix, n_extra) != (len(prefix), len(suffix), len(extra))
    return InfillPrompt(ids, tokenizer.decode(ids), truncated)


def _budget(state: ServerState, n_predict: int) -> int:
    """Prompt tokens allowed: the context less the answer's reserve."""
    length = state.max_model_len
    reserve = n_predict if n_predict > 0 else max(1, min(DEFAULT_RESERVE, length // 4))
    return length - reserve


async def create_infill(state: ServerState, req: InfillRequest,
                        raw: Request) -> Response | InfillResponse:
    model = state.check_model(req.model)
    state.tokenizers.check_chars(len(req.prompt), "prompt")
    if req.n_predict >= state.max_model_len:
        raise ContextLengthError(
            f"n_predict={req.n_predict} does not fit this model's maximum context length of "
            f"{state.max_model_len} tokens with any prompt; lower it or send -1",
            param="n_predict",
        )
    prompt = await state.tokenizers.run(infill_prompt, state.tokenizer, req,
                                        _budget(state, req.n_predict), model)
    params = build({
        "temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p,
        "min_p": req.min_p, "repetition_penalty": req.repeat_penalty,
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
        "seed": None if req.seed == -1 else req.seed, "stop": list(req.stop),
        "ignore_eos": req.ignore_eos, "max_tokens": None if req.n_predict == -1 else req.n_predict,
    }, rename={"max_tokens": "n_predict", "repetition_penalty": "repeat_penalty"})
    tracked = (await submit(state, new_request_id("infill"),
                            [PromptInput(prompt.token_ids, prompt.text)], params,
                            coalesce=not req.stream))[0]
    view = _InfillView(req, model, prompt)
    if req.stream:
        return SSEResponse(view.stream(tracked), on_close=lambda: close_all([tracked]))
    try:
        final = await until_disconnect(raw, tracked.collect())
    finally:
        tracked.close()
    return view.response(final, tracked)


def stop_type(c: CompletionOutput) -> tuple[StopType, str]:
    """llama.cpp's stop_type and stopping_word for how a completion ended."""
    if c.finish_reason == "length":
        return "limit", ""
    if c.finish_reason == "stop":
        return ("word", c.stop_reason) if isinstance(c.stop_reason, str) else ("eos", "")
    return "none", ""


class _InfillView:
    def __init__(self, req: InfillRequest, model: str, prompt: InfillPrompt):
        self.req = req
        self.model = model
        self.prompt = prompt

    def _tokens(self, ids: list[int]) -> list[int]:
        return list(ids) if self.req.return_tokens else []

    def response(self, final: RequestOutput, tracked: TrackedRequest) -> InfillResponse:
        c = final.outputs[0]
        kind, word = stop_type(c)
        return InfillResponse(
            content=c.text, tokens=self._tokens(c.token_ids), stop=True, model=self.model,
            tokens_predicted=len(c.token_ids), tokens_evaluated=len(self.prompt.token_ids),
            tokens_cached=final.num_cached_tokens, prompt=self.prompt.text,
            has_new_line="\n" in c.text, truncated=self.prompt.truncated, stop_type=kind,
            stopping_word=word, timings=_timings(tracked, len(c.token_ids)),
        )

    def _chunk(self, content: str, ids: list[int], predicted: int) -> bytes:
        return sse_event({"index": 0, "content": content, "tokens": self._tokens(ids),
                          "stop": False, "tokens_predicted": predicted,
                          "tokens_evaluated": len(self.prompt.token_ids)})

    async def stream(self, tracked: TrackedRequest) -> AsyncIterator[bytes]:
        try:
            final = None
            async for out in tracked:
                c = out.outputs[0]
                if c.delta_text or c.delta_token_ids:
                    yield self._chunk(c.delta_text, c.delta_token_ids, len(c.token_ids))
                if out.finished:
                    final = out
            if final is not None:
                last = self.response(final, tracked).model_dump()
                last["content"] = ""  # streamed already, as llama.cpp's last event does
                last["tokens"] = []
                yield sse_event(last)
        except SoarError as e:
            yield sse_event(stream_error_payload(e))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: end this stream only
            logger.exception("infill stream failed")
            yield sse_event({"error": {"message": f"internal server error ({type(e).__name__})",
                                       "type": "internal_error", "param": None, "code": 500}})
        finally:
            tracked.close()


def _timings(tracked: TrackedRequest, predicted: int) -> InfillTimings:
    first = tracked.first_token_time
    last = tracked.last_token_time or time.time()
    prompt_ms = ((first or last) - tracked.arrival) * 1000.0
    predicted_ms = (last - first) * 1000.0 if first is not None else 0.0
    steps = predicted - 1  # the first token comes with the prompt
    per_token = predicted_ms / steps if steps > 0 else None
    return InfillTimings(
        prompt_n=tracked.num_prompt_tokens, prompt_ms=prompt_ms, predicted_n=predicted,
        predicted_ms=predicted_ms, predicted_per_token_ms=per_token,
        predicted_per_second=1000.0 / per_token if per_token else None,
    )
