"""run_server: load the engine, build the app, serve it with uvicorn until SIGTERM/SIGINT.

On a signal uvicorn stops accepting connections and lets in-flight requests finish for up to
``shutdown_timeout_s`` seconds. Shortly before that deadline the requests still running are ended
by the server itself (DrainingServer): each stream gets an error event and ``[DONE]``, each
non-streaming request a 503, so no client sees a connection cut mid-response. The app's shutdown
then stops the engine thread and the process exits with status 0.

An engine that can no longer run (a tensor-parallel worker died: a fatal engine error) makes the
server shut down the same way and exit with status 1, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from soarllm.config import EngineArgs
from soarllm.serve.access_log import ACCESS_LOGGER
from soarllm.serve.config import (
    ServerConfig,
    engine_threads_for,
    model_process_threads,
    runs_model_in_worker,
)

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


def drain_margin(timeout_s: float) -> float:
    """How long before the graceful-shutdown deadline the server ends what is still running:
    enough for the error events to reach their clients."""
    return min(1.0, timeout_s / 4)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that, on shutdown, calls ``end_requests`` a little before the graceful
    timeout runs out, so requests end with an answer instead of being cancelled mid-response."""

    def __init__(self, config: uvicorn.Config, end_requests: Callable[[], Any],
                 engine_dead: Callable[[], BaseException | None] | None = None):
        super().__init__(config)
        self._end_requests = end_requests
        self._engine_dead = engine_dead
        self.stopped_by_engine = False

    async def on_tick(self, counter: int) -> bool:
        if self._engine_dead is not None and not self.stopped_by_engine:
            error = self._engine_dead()
            if error is not None:
                logger.error("the engine cannot run any more (%s); shutting the server down",
                             error)
                self.stopped_by_engine = True
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timeout = self.config.timeout_graceful_shutdown

        async def end_before_deadline() -> None:
            if timeout is not None:
                await asyncio.sleep(max(0.0, timeout - drain_margin(timeout)))
            count = self._end_requests()
            if count:
                logger.warning("shutdown timeout: ended %d unfinished request(s)", count)

        ender = asyncio.create_task(end_before_deadline())
        try:
            await super().shutdown(sockets)
        finally:
            ender.cancel()


def _fatal(error: BaseException | None) -> BaseException | None:
    """``error`` if it means the engine can never run again (a dead worker), else None."""
    return error if getattr(error, "fatal", False) else None


def end_requests_for_shutdown(engine: Any) -> Callable[[], int]:
    from soarllm.engine.failures import ServerShuttingDownError

    def end() -> int:
        engine.stop_accepting()
        return engine.fail_all(ServerShuttingDownError(
            "the server is shutting down and its shutdown timeout ran out before this request "
            "finished; retry it (on another replica)"))

    return end


def run_server(engine_args: EngineArgs, config: ServerConfig) -> int:
    configure_logging(config.log_level)
    device = engine_args.resolved_device()
    if runs_model_in_worker(engine_args, config.data_parallel_size, device):
        from soarllm.distributed.multiproc import prestart_workers

        workers = model_process_threads(config.engine_threads)
        engine_args = dataclasses.replace(engine_args, distributed_executor_backend="mp",
                                          worker_threads=workers)
        # the worker loads the model while this process imports the rest and reads the tokenizer
        prestart_workers(engine_args)
        threads = 1  # this process schedules, detokenizes and serves HTTP
        logger.info("the model runs in a worker process with %d torch thread(s) "
                    "(--engine-threads; --distributed-executor-backend uni keeps it here)", workers)
    else:
        threads = engine_threads_for(config.engine_threads, device)
        if threads is not None:
            logger.info("engine uses %d torch thread(s) (--engine-threads)", threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    logger.info("loading %s", engine_args.model)
    from soarllm.engine.async_engine import AsyncLLMEngine
    from soarllm.engine.llm_engine import LLMEngine
    from soarllm.serve.app import build_app

    if config.data_parallel_size > 1:
        from soarllm.engine.data_parallel import DataParallelEngine

        engine = DataParallelEngine.from_engine_args(engine_args, config.data_parallel_size,
                                                     torch_threads=threads)
        llm_engines = [r.engine for r in engine.replicas]
    else:
        llm_engines = [LLMEngine.from_engine_args(engine_args)]
        engine = AsyncLLMEngine(llm_engines[0], torch_threads=threads)
    if config.chat_template is not None:
        for llm_engine in llm_engines:
            llm_engine.tokenizer.chat_template = config.chat_template
    app = build_app(engine, config)
    if config.resolved_api_key() is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key (--api-key / SOARLLM_API_KEY)",
                       config.host)
    server = DrainingServer(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None,
        log_level=config.log_level.lower(), access_log=False, lifespan="on",
        timeout_graceful_shutdown=config.shutdown_timeout_s, timeout_keep_alive=5,
    ), end_requests=end_requests_for_shutdown(engine),
        engine_dead=lambda: _fatal(engine.fatal_error))
    # uvicorn re-raises the signal that stopped it once it is done: make that a no-op so a
    # SIGTERM'd server exits with status 0 after its graceful shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    logger.info("stopped")
    return 0 if server.started and not server.stopped_by_engine else 1
