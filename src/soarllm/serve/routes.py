"""The HTTP routes. Handlers are thin: parse (pydantic), call the serving module, return."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from soarllm import __version__
from soarllm.errors import InvalidRequestError
from soarllm.serve import infill, openai_chat, openai_completions, tgi
from soarllm.serve.metrics import CONTENT_TYPE
from soarllm.serve.playground import playground_response
from soarllm.serve.prompts import chat_input, text_input
from soarllm.serve.protocol_infill import InfillRequest, InfillResponse
from soarllm.serve.protocol_openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    StrictModel,
)
from soarllm.serve.protocol_tgi import (
    TGIGenerateRequest,
    TGIInfo,
    TGIRequest,
    TGIResponse,
    TGIStreamResponse,
)
from soarllm.serve.request_fields import PromptText, TokenizerId
from soarllm.serve.routing import SoarRoute
from soarllm.serve.state import ServerState, get_state
from soarllm.serve.usage import caller, usage_report

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}
_SSE = {"text/event-stream": {}}


def _json(result: Response | BaseModel) -> Response:
    """Responses are built by the serving modules already: send them without re-validation."""
    if isinstance(result, Response):
        return result
    return JSONResponse(result.model_dump(mode="json"))


# -- OpenAI ---------------------------------------------------------------------------------

openai_router = APIRouter(prefix="/v1", tags=["openai"], responses=_ERRORS,
                          route_class=SoarRoute)


@openai_router.post(
    "/completions", response_model=CompletionResponse,
    responses={200: {"content": _SSE, "description": "JSON, or SSE chunks with stream=true"}},
)
async def completions(body: CompletionRequest, request: Request,
                      state: ServerState = Depends(get_state)) -> Any:
    return _json(await openai_completions.create_completion(state, body, request))


@openai_router.post(
    "/chat/completions", response_model=ChatCompletionResponse,
    responses={200: {"content": _SSE, "description": "JSON, or SSE chunks with stream=true"}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           state: ServerState = Depends(get_state)) -> Any:
    return _json(await openai_chat.create_chat_completion(state, body, request))


def _card(state: ServerState, name: str) -> ModelCard:
    return ModelCard(id=name, created=int(state.started), root=state.engine.model_name,
                     max_model_len=state.max_model_len)


@openai_router.get("/models", response_model=ModelList)
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    return ModelList(data=[_card(state, n) for n in state.model_names])


@openai_router.get("/usage")
async def usage(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Requests and tokens per API key since the server started: the caller's own key, or every
    key for an admin key (--admin-api-key) or on a server without keys."""
    limiter = state.limiter
    return usage_report(state.usage, caller(), {"rpm": limiter.rpm, "tpm": limiter.tpm},
                        limiter.used if limiter.enabled else None)


@openai_router.get("/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, state: ServerState = Depends(get_state)) -> ModelCard:
    return _card(state, state.check_model(model or "?"))


# -- TGI ------------------------------------------------------------------------------------

_TGI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": "TGI error: {error, error_type}"} for code in (401, 413, 422, 429, 503)
}
tgi_router = APIRouter(tags=["tgi"], responses=_TGI_ERRORS, route_class=SoarRoute)


@tgi_router.post("/generate", response_model=TGIResponse)
async def tgi_generate(body: TGIGenerateRequest, request: Request,
                       state: ServerState = Depends(get_state)) -> Any:
    return JSONResponse(await tgi.generate(state, body, request))


@tgi_router.post(
    "/generate_stream",
    responses={200: {"content": _SSE, "model": TGIStreamResponse,
                     "description": "SSE: one event per token"}},
)
async def tgi_generate_stream(body: TGIRequest,
                              state: ServerState = Depends(get_state)) -> Response:
    return await tgi.generate_stream(state, body)


@tgi_router.post(
    "/", response_model=list[TGIResponse],
    responses={200: {"content": _SSE, "description": "a list of one response, or SSE"}},
)
async def tgi_compat(body: TGIRequest, request: Request,
                     state: ServerState = Depends(get_state)) -> Any:
    """TGI's compatibility route: /generate_stream when stream=true, else [/generate]."""
    if body.stream:
        return await tgi.generate_stream(state, body)
    return JSONResponse([await tgi.generate(state, body, request)])


@tgi_router.get("/info", response_model=TGIInfo)
async def tgi_info(state: ServerState = Depends(get_state)) -> TGIInfo:
    return TGIInfo(
        model_id=state.default_model, max_input_tokens=state.max_model_len - 1,
        max_total_tokens=state.max_model_len, version=__version__,
    )


# -- operations -----------------------------------------------------------------------------

ops_router = APIRouter(tags=["operations"], route_class=SoarRoute)


@ops_router.get("/", include_in_schema=False)
async def root() -> Response:
    """The playground: a chat page that talks to this server's API (static, no key needed)."""
    return playground_response()


@ops_router.post(
    "/infill",
    # with response_fields an answer holds only the asked fields: a partial object, or a list of
    # them with n_cmpl > 1
    response_model=InfillResponse | list[InfillResponse] | dict[str, Any] | list[dict[str, Any]],
    tags=["llama.cpp"],
    responses={**_ERRORS,
               200: {"content": _SSE, "description": "JSON (one answer; a list with n_cmpl > 1; "
                     "only the asked fields with response_fields), or SSE events with "
                     "stream=true"}},
)
async def infill_route(body: InfillRequest, request: Request,
                       state: ServerState = Depends(get_state)) -> Any:
    """Code infilling (fill-in-the-middle) as llama.cpp's server answers it; needs a model with
    FIM tokens (a 400 says so otherwise)."""
    return _json(await infill.create_infill(state, body, request))


@ops_router.get("/health", responses={503: {"description": "the engine is not running"}})
async def health(state: ServerState = Depends(get_state)) -> JSONResponse:
    engine = state.engine
    if engine.is_healthy:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unhealthy", "engine_running": engine.is_running},
                        status_code=503)


@ops_router.get("/metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@ops_router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


class TokenizeRequest(StrictModel):
    """Exactly one of ``prompt`` (text) or ``messages`` (rendered with the chat template)."""

    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    model: str | None = None
    # absent when not used, never null (the schema's oneOf says which one is required)
    prompt: PromptText = None  # type: ignore[assignment]
    messages: list[ChatMessage] = Field(None, min_length=1)  # type: ignore[assignment]
    add_special_tokens: bool = True


class TokenizeResponse(StrictModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[TokenizerId] = Field(max_length=1_000_000)


class DetokenizeResponse(StrictModel):
    prompt: str


@ops_router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest,
                   state: ServerState = Depends(get_state)) -> TokenizeResponse:
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("send exactly one of 'prompt' or 'messages'", param="prompt")
    if body.prompt is not None:
        ids = await text_input(state, body.prompt, "prompt", body.add_special_tokens)
    else:
        ids = (await chat_input(state, body.messages or [])).token_ids
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)


@ops_router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest,
                     state: ServerState = Depends(get_state)) -> DetokenizeResponse:
    state.check_model(body.model)
    text = await state.tokenizers.run(_detokenize, state.tokenizer, body.tokens)
    return DetokenizeResponse(prompt=text)


def _detokenize(tokenizer: Any, tokens: list[int]) -> str:
    vocab = len(tokenizer)
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(
            f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens"
        )
    return tokenizer.decode(tokens)
