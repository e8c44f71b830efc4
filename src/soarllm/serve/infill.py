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

What llama.cpp's editor plugins (llama.vim, llama.vscode) send on every request works as in
llama.cpp's server (tools/server): ``n_indent`` and ``t_max_predict_ms`` are stop rules checked
as text arrives (``indent_cut``, ``time_limit_reached``), both ending with stop_type "limit";
``samplers`` switches off the samplers it leaves out (``sampler_overrides``);
``response_fields`` keeps only the fields named, "a/b" paths flattened under their own key
(``select_fields``); ``id_slot`` and ``t_max_prompt_ms`` (not enforced by llama.cpp either) are
accepted and ignored. ``n_probs`` adds llama.cpp's ``completion_probabilities``
(infill_probs.py), on the whole answer or on each streamed chunk. ``n_predict: 0`` (llama.vim's
warm-up request, sent whenever its ring of context chunks changes) generates nothing: the prompt
is computed so that its full blocks stay in the prefix cache for the next request, and the
answer has empty content, no tokens and stop_type "limit", as llama.cpp's has.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from soarllm.errors import ContextLengthError, InvalidRequestError, SoarError
from soarllm.model.tokenizer import fim_tokens
from soarllm.outputs import CompletionOutput
from soarllm.serve.generation import PromptInput, TrackedRequest, close_all, new_request_id, submit
from soarllm.serve.infill_probs import TokenPieces, completion_probabilities
from soarllm.serve.prompts import encode
from soarllm.serve.protocol_infill import (
    SAMPLER_ALIASES,
    InfillRequest,
    InfillResponse,
    InfillTimings,
    StopType,
)
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
    if n_predict == 0:
        reserve = 1  # a warm-up request computes one token, never sent
    else:
        reserve = n_predict if n_predict > 0 else max(1, min(DEFAULT_RESERVE, length // 4))
    return length - reserve


# -- llama.cpp's options for editor plugins ---------------------------------------------------

def indent_cut(text: str, n_indent: int, start: int = 0) -> int | None:
    """llama.cpp's ``n_indent`` rule: the length to cut ``text`` to, or None while it holds.

    Every line after the first must start with at least ``n_indent`` spaces or tabs. The first
    line that starts with fewer and has any other character after them (its own newline counts,
    as in llama.cpp) ends the answer: the content keeps that line's newline and indentation and
    loses the rest (llama.cpp erases from where the line's text begins). ``start``: an offset
    before which the lines are known to hold (to scan only new text)."""
    if n_indent <= 0:
        return None
    nl = text.find("\n", start)
    while nl >= 0:
        pos = nl + 1
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos >= len(text):
            return None  # the line has no text yet
        if pos - (nl + 1) < n_indent:
            return pos
        nl = text.find("\n", nl + 1)
    return None


def time_limit_reached(new_text: str, elapsed_ms: float, t_max_predict_ms: int) -> bool:
    """llama.cpp's ``t_max_predict_ms`` rule: stop at a token whose text has a newline once more
    than ``t_max_predict_ms`` have passed since the first generated token (off when <= 0)."""
    return t_max_predict_ms > 0 and "\n" in new_text and elapsed_ms > t_max_predict_ms


def sampler_overrides(samplers: list[str] | None) -> dict[str, Any]:
    """The sampling options that llama.cpp's ``samplers`` list switches off by leaving them out
    (llama.cpp builds its chain from the list alone). The engine applies the others in its own
    fixed order (penalties, top_k, top_p, min_p, temperature); infill and the samplers whose
    options this endpoint does not take (dry, typ_p, top_n_sigma, xtc, adaptive_p) change
    nothing."""
    if samplers is None:
        return {}
    chosen = {SAMPLER_ALIASES[name] for name in samplers}
    off: dict[str, Any] = {}
    if "penalties" not in chosen:
        off.update(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    if "top_k" not in chosen:
        off["top_k"] = 0
    if "top_p" not in chosen:
        off["top_p"] = 1.0
    if "min_p" not in chosen:
        off["min_p"] = 0.0
    if "temperature" not in chosen:
        off["temperature"] = 1.0  # llama.cpp then samples the distribution as it is
    return off


def select_fields(paths: list[str], body: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's ``response_fields``: each path's value under the path itself as key ("a/b":
    field b of object a); a path that leads nowhere is left out."""
    out: dict[str, Any] = {}
    for path in paths:
        node: Any = body
        for key in path.split("/"):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            out[path] = node
    return out


class StopRules:
    """n_indent and t_max_predict_ms applied to one answer as its text grows."""

    def __init__(self, req: InfillRequest, clock: Callable[[], float] = time.time):
        self.n_indent = req.n_indent
        self.t_max_predict_ms = req.t_max_predict_ms
        self.clock = clock
        self._checked = 0  # the lines before this offset keep the indentation

    @property
    def active(self) -> bool:
        return self.n_indent > 0 or self.t_max_predict_ms > 0

    def check(self, text: str, new_text: str, first_token_time: float | None) -> int | None:
        """The length to cut the answer to when a rule ends it here, else None."""
        cut = indent_cut(text, self.n_indent, self._checked)
        if cut is not None:
            return cut
        self._checked = max(self._checked, text.rfind("\n"))
        if first_token_time is not None and time_limit_reached(
                new_text, (self.clock() - first_token_time) * 1000.0, self.t_max_predict_ms):
            return len(text)
        return None


# -- the endpoint -----------------------------------------------------------------------------

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
    if req.stream and req.n_cmpl > 1:
        raise InvalidRequestError(
            "n_cmpl > 1 is served only with stream=false; send stream=false or n_cmpl=1",
            param="n_cmpl")
    prompt = await state.tokenizers.run(infill_prompt, state.tokenizer, req,
                                        _budget(state, req.n_predict), model)
    options = {
        "temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p,
        "min_p": req.min_p, "repetition_penalty": req.repeat_penalty,
        "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
    }
    warm_up = req.n_predict == 0
    params = build({
        **options, **sampler_overrides(req.samplers),
        "n": 1 if warm_up else req.n_cmpl, "seed": None if req.seed == -1 else req.seed,
        "stop": list(req.stop), "ignore_eos": req.ignore_eos,
        # a warm-up request: the prompt and one token, dropped (the engine always samples one)
        "max_tokens": None if req.n_predict == -1 else max(1, req.n_predict),
        "logprobs": req.n_probs if req.n_probs and not warm_up else None,
    }, rename={"max_tokens": "n_predict", "repetition_penalty": "repeat_penalty",
               "logprobs": "n_probs"})
    tracked = (await submit(state, new_request_id("infill"),
                            [PromptInput(prompt.token_ids, prompt.text)], params,
                            # the stop rules see every step (the token where one fires)
                            coalesce=not (req.stream or StopRules(req).active)))[0]
    view = _InfillView(req, model, prompt,
                       TokenPieces(state.tokenizer) if req.n_probs and not warm_up else None)
    if req.stream:
        return SSEResponse(view.stream(tracked), on_close=lambda: close_all([tracked]))
    try:
        answers = await until_disconnect(raw, view.run(tracked))
    finally:
        tracked.close()
    bodies = [view.shape(view.body(view.response(a, tracked))) for a in answers]
    return JSONResponse(bodies[0] if len(bodies) == 1 else bodies)


def stop_type(c: CompletionOutput) -> tuple[StopType, str]:
    """llama.cpp's stop_type and stopping_word for how a completion ended."""
    if c.finish_reason == "length":
        return "limit", ""
    if c.finish_reason == "stop":
        return ("word", c.stop_reason) if isinstance(c.stop_reason, str) else ("eos", "")
    return "none", ""


@dataclass
class _Answer:
    index: int
    text: str
    token_ids: list[int]
    stop_type: StopType
    stopping_word: str
    num_cached: int
    logprobs: list[Any] | None = None


@dataclass
class _Delta:
    index: int
    text: str
    token_ids: list[int]
    num_generated: int
    logprobs: list[Any] | None = None


class _InfillView:
    def __init__(self, req: InfillRequest, model: str, prompt: InfillPrompt,
                 pieces: TokenPieces | None = None):
        self.req = req
        self.model = model
        self.prompt = prompt
        self.pieces = pieces  # n_probs > 0
        self.answers: dict[int, _Answer] = {}

    def _probs(self, token_ids: list[int], logprobs: list[Any] | None) -> list[Any] | None:
        if self.pieces is None:
            return None
        return completion_probabilities(self.pieces, token_ids, logprobs, self.req.n_probs)

    @staticmethod
    def body(r: InfillResponse) -> dict[str, Any]:
        out = r.model_dump(mode="json")
        if out.get("completion_probabilities") is None:
            out.pop("completion_probabilities", None)  # as llama.cpp: only when asked
        return out

    def _tokens(self, ids: list[int]) -> list[int]:
        return list(ids) if self.req.return_tokens else []

    def shape(self, body: dict[str, Any]) -> dict[str, Any]:
        """The answer as the request's response_fields ask for it."""
        return select_fields(self.req.response_fields, body) if self.req.response_fields else body

    async def deltas(self, tracked: TrackedRequest) -> AsyncIterator[_Delta]:
        """Each completion's new text and tokens as they come, cut by the stop rules; a
        completion's ``answers`` entry is set when it ends. Once a rule has ended every
        completion, the engine request is aborted."""
        if self.req.n_predict == 0:  # warm-up: the prompt is computed; nothing is answered
            async for out in tracked:
                if all(c.finished for c in out.outputs):
                    for i in range(self.req.n_cmpl):
                        self.answers[i] = _Answer(i, "", [], "limit", "", out.num_cached_tokens)
            return
        rules = [StopRules(self.req) for _ in range(self.req.n_cmpl)]
        sent = [0] * self.req.n_cmpl
        async for out in tracked:
            for c in out.outputs:
                i = c.index
                if i in self.answers:
                    continue  # cut by a rule already
                cut = None
                if rules[i].active and (c.delta_text or c.delta_token_ids):
                    cut = rules[i].check(c.text, c.delta_text, tracked.first_token_time)
                text = c.text if cut is None else c.text[:cut]
                if text[sent[i]:] or c.delta_token_ids:
                    yield _Delta(i, text[sent[i]:], list(c.delta_token_ids), len(c.token_ids),
                                 c.delta_logprobs)
                sent[i] = len(text)
                if cut is not None:
                    self.answers[i] = _Answer(i, text, list(c.token_ids), "limit", "",
                                              out.num_cached_tokens, c.logprobs)
                elif c.finished:
                    kind, word = stop_type(c)
                    self.answers[i] = _Answer(i, c.text, list(c.token_ids), kind, word,
                                              out.num_cached_tokens, c.logprobs)
            if len(self.answers) == self.req.n_cmpl:
                tracked.close()  # a no-op when the engine finished it
                return

    async def run(self, tracked: TrackedRequest) -> list[_Answer]:
        async for _ in self.deltas(tracked):
            pass
        if len(self.answers) < self.req.n_cmpl:
            raise RuntimeError(f"request {tracked.request_id} ended without a final output")
        return [self.answers[i] for i in range(self.req.n_cmpl)]

    def response(self, a: _Answer, tracked: TrackedRequest) -> InfillResponse:
        return InfillResponse(
            index=a.index, content=a.text, tokens=self._tokens(a.token_ids), stop=True, model=self.model,
            tokens_predicted=len(a.token_ids), tokens_evaluated=len(self.prompt.token_ids),
            tokens_cached=a.num_cached, prompt=self.prompt.text,
            has_new_line="\n" in a.text, truncated=self.prompt.truncated, stop_type=a.stop_type,
            stopping_word=a.stopping_word,
            timings=_timings(tracked, len(a.token_ids), a.num_cached),
            completion_probabilities=self._probs(a.token_ids, a.logprobs),
        )

    def _chunk(self, d: _Delta) -> bytes:
        event = {"index": 0, "content": d.text, "tokens": self._tokens(d.token_ids),
                 "stop": False, "tokens_predicted": d.num_generated,
                 "tokens_evaluated": len(self.prompt.token_ids)}
        probs = self._probs(d.token_ids, d.logprobs)
        if probs is not None:
            event["completion_probabilities"] = probs
        return sse_event(event)

    async def stream(self, tracked: TrackedRequest) -> AsyncIterator[bytes]:
        try:
            async for d in self.deltas(tracked):
                yield self._chunk(d)
            if 0 in self.answers:
                last = self.body(self.response(self.answers[0], tracked))
                last["content"] = ""  # streamed already, as llama.cpp's last event does
                last["tokens"] = []
                last.pop("completion_probabilities", None)  # so were the probabilities
                yield sse_event(self.shape(last))
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


def _timings(tracked: TrackedRequest, predicted: int, cached: int) -> InfillTimings:
    first = tracked.first_token_time
    last = tracked.last_token_time or time.time()
    prompt_ms = ((first or last) - tracked.arrival) * 1000.0
    computed = max(0, tracked.num_prompt_tokens - cached)  # llama.cpp's prompt_n
    predicted_ms = (last - first) * 1000.0 if first is not None else 0.0
    steps = predicted - 1  # the first token comes with the prompt
    per_token = predicted_ms / steps if steps > 0 else None
    return InfillTimings(
        cache_n=cached, prompt_n=computed, prompt_ms=prompt_ms,
        prompt_per_token_ms=prompt_ms / computed if computed else None,
        prompt_per_second=1000.0 * computed / prompt_ms if prompt_ms > 0 else None,
        predicted_n=predicted, predicted_ms=predicted_ms, predicted_per_token_ms=per_token,
        predicted_per_second=1000.0 / per_token if per_token else None,
    )
