"""build_app(engine, config): the FastAPI application of `soar serve`.

Everything the routes share lives on ``app.state.soar`` (a ServerState); the app starts the engine
thread when it starts and stops it when it stops (uvicorn has by then let in-flight requests end).
With API keys every route but /health and the playground page (GET /) needs one (and /metrics
too unless ``public_metrics``); usage and rate limits are kept per key (usage.py,
rate_limit.py); ``allowed_origins`` turns on CORS for browser clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from soarllm import __version__
from soarllm.engine.async_engine import AsyncLLMEngine
from soarllm.model.tokenizer import fim_tokens
from soarllm.serve.access_log import AccessLogMiddleware
from soarllm.serve.auth import BearerAuthMiddleware, protected_paths
from soarllm.serve.body_limit import BodySizeLimitMiddleware
from soarllm.serve.config import ServerConfig
from soarllm.serve.errors import install_error_handlers
from soarllm.serve.metrics import ServerMetrics
from soarllm.serve.openapi import ServedLimits, install_openapi
from soarllm.serve.rate_limit import RateLimiter
from soarllm.serve.routes import openai_router, ops_router, tgi_router
from soarllm.serve.state import ServerState
from soarllm.serve.streaming import ClientDisconnected
from soarllm.serve.tokenization import TokenizerWorkers
from soarllm.serve.usage import ANONYMOUS, UsageLedger

# 499: the client closed the connection before the response (nobody reads it; logs do)
CLIENT_CLOSED_REQUEST = 499


def build_app(engine: AsyncLLMEngine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    names = list(config.served_model_names) or [engine.model_name]
    api_keys = config.api_keys()
    usage = UsageLedger([k.name for k in api_keys] or [ANONYMOUS])
    metrics = ServerMetrics(names[0], lambda: engine.stats, usage=usage)
    tokenizers = TokenizerWorkers(engine.tokenizer, engine.max_model_len,
                                  config.tokenizer_workers)
    state = ServerState(engine=engine, config=config, metrics=metrics, model_names=names,
                        tokenizers=tokenizers, usage=usage,
                        limiter=RateLimiter(config.rate_limit_rpm, config.rate_limit_tpm))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown(timeout=0.0)
            tokenizers.shutdown()

    app = FastAPI(
        title="soarllm",
        version=__version__,
        description="OpenAI- and TGI-compatible LLM server",
        lifespan=lifespan,
    )
    app.state.soar = state
    install_error_handlers(app)
    install_openapi(app, ServedLimits(
        max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
        tokenizer_size=len(engine.tokenizer), max_prompt_chars=tokenizers.max_prompt_chars,
        fim=fim_tokens(engine.tokenizer) is not None,
    ))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    app.include_router(openai_router)
    app.include_router(tgi_router)
    app.include_router(ops_router)
    # outermost last: access log -> CORS -> auth -> body size limit -> routes
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_body_bytes)
    if api_keys:
        app.add_middleware(BearerAuthMiddleware, keys=api_keys,
                           protected=protected_paths(public_metrics=config.public_metrics))
    if config.allowed_origins:
        # CORS answers preflights before auth, and its headers reach 401s too
        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
            allow_headers=["*"], expose_headers=["x-request-id", "retry-after"],
        )
    app.add_middleware(AccessLogMiddleware, metrics=metrics, enabled=config.access_log)
    return app
