"""run_server: load the engine, build the app, serve it with uvicorn until SIGTERM/SIGINT.

On a signal uvicorn stops accepting connections, lets in-flight requests finish for up to
``shutdown_timeout_s`` seconds, cancels the rest (their engine requests are aborted), and the app's
shutdown stops the engine thread. The process then exits with status 0.
"""

from __future__ import annotations

import logging
import signal
import sys

from soarllm.config import EngineArgs
from soarllm.serve.access_log import ACCESS_LOGGER
from soarllm.serve.config import ServerConfig, engine_threads_for

logger = logging.getLogger("soarllm.serve")


def configure_logging(level: str) -> None:
    """Plain lines for the server's own logs; access logs are bare JSON lines (one per request)."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(
        level=numeric, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    access = logging.getLogger(ACCESS_LOGGER)
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.propagate = False
    access.setLevel(numeric)


def run_server(engine_args: EngineArgs, config: ServerConfig) -> int:
    import uvicorn

    from soarllm.engine.async_engine import AsyncLLMEngine
    from soarllm.engine.llm_engine import LLMEngine
    from soarllm.serve.app import build_app

    configure_logging(config.log_level)
    threads = engine_threads_for(config.engine_threads, engine_args.resolved_device())
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        logger.info("engine uses %d torch thread(s) (--engine-threads)", threads)
    logger.info("loading %s", engine_args.model)
    llm_engine = LLMEngine.from_engine_args(engine_args)
    if config.chat_template is not None:
        llm_engine.tokenizer.chat_template = config.chat_template
    engine = AsyncLLMEngine(llm_engine, torch_threads=threads)
    app = build_app(engine, config)
    if config.resolved_api_key() is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key (--api-key / SOARLLM_API_KEY)",
                       config.host)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None,
        log_level=config.log_level.lower(), access_log=False, lifespan="on",
        timeout_graceful_shutdown=config.shutdown_timeout_s, timeout_keep_alive=5,
    ))
    # uvicorn re-raises the signal that stopped it once it is done: make that a no-op so a
    # SIGTERM'd server exits with status 0 after its graceful shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    logger.info("stopped")
    return 0 if server.started else 1
