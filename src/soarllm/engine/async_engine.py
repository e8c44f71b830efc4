"""AsyncLLMEngine: the synchronous LLMEngine driven by a background thread, streamed to asyncio.

The engine is not thread-safe, so every call into it happens on one dedicated thread, the *engine
thread*. The event loop talks to that thread through a command queue (add / abort / stop); the
thread applies the pending commands between two steps, runs ``step()`` while there is work, and
blocks on the queue when there is none (no busy spinning). Each step's outputs are handed back to
the event loop in one ``call_soon_threadsafe`` call and dispatched to the per-request streams.

A request's stream is an async iterator of ``RequestOutput``; closing it before the request
finishes (the client went away, the handler was cancelled) aborts the request in the engine, which
frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from soarllm.engine.failures import (
    EngineDeadError,
    RequestFailedError,
    ServerShuttingDownError,
    describe,
)
from soarllm.errors import OverloadedError, SoarError
from soarllm.outputs import CompletionOutput, RequestOutput
from soarllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "EngineDeadError", "RequestFailedError", "RequestStream",
           "ServerShuttingDownError", "merge_outputs"]

# After this many steps in a row in which every request failed, the engine is reported unhealthy
# and takes no more requests (a broken forward, not one bad request: those are contained).
_MAX_CONSECUTIVE_STEP_FAILURES = 3


class SyncEngine(Protocol):
    """What AsyncLLMEngine needs from the synchronous engine (LLMEngine or a test double)."""

    tokenizer: Any
    max_model_len: int
    model_name: str

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None: ...

    def abort_request(self, request_ids: str | Iterable[str]) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished_requests(self) -> bool: ...

    def get_stats(self) -> Any: ...


# -- commands sent to the engine thread -----------------------------------------------------------


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    done: Callable[[BaseException | None], None]  # called on the engine thread


@dataclass
class _Abort:
    request_ids: list[str]


class _Stop:
    pass


# -- per-request stream ---------------------------------------------------------------------------


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One output equivalent to ``older`` followed by ``newer``: newer's cumulative fields and the
    concatenation of both deltas (per completion index)."""
    by_index = {c.index: c for c in older.outputs}
    merged: list[CompletionOutput] = []
    for c in newer.outputs:
        o = by_index.pop(c.index, None)
        if o is None:
            merged.append(c)
            continue
        lps = None
        if o.delta_logprobs is not None or c.delta_logprobs is not None:
            lps = list(o.delta_logprobs or []) + list(c.delta_logprobs or [])
        merged.append(
            replace(
                c,
                delta_text=o.delta_text + c.delta_text,
                delta_token_ids=list(o.delta_token_ids) + list(c.delta_token_ids),
                delta_logprobs=lps,
            )
        )
    merged.extend(by_index.values())
    merged.sort(key=lambda c: c.index)
    return replace(
        newer,
        outputs=merged,
        prompt_logprobs=newer.prompt_logprobs if newer.prompt_logprobs is not None
        else older.prompt_logprobs,
    )


class RequestStream:
    """The outputs of one request, in order. Lives on the event loop thread.

    With ``coalesce=True`` a consumer that fell behind gets the pending outputs merged into one
    (fewer, larger stream chunks under load); otherwise it gets every step's output.
    """

    def __init__(self, request_id: str, on_close: Callable[[str], None], coalesce: bool = True):
        self.request_id = request_id
        self._on_close = on_close
        self._coalesce = coalesce
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()
        self.finished = False  # the engine produced the last output (or failed the request)
        self._closed = False

    # called by AsyncLLMEngine on the loop thread
    def _put(self, item: RequestOutput | BaseException) -> None:
        if self._closed:
            return
        self._items.append(item)
        if isinstance(item, BaseException) or item.finished:
            self.finished = True
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._items:
            if self.finished or self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        while self._coalesce and self._items and not isinstance(self._items[0], BaseException):
            item = merge_outputs(item, self._items.popleft())  # type: ignore[arg-type]
        return item

    def close(self) -> None:
        """Stop listening; abort the request if the engine has not finished it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._items.clear()
        self._ready.set()
        self._on_close(self.request_id)


# -- the engine wrapper ---------------------------------------------------------------------------


class GeneratesFromStreams:
    """``generate`` over an engine's ``add_request`` (AsyncLLMEngine, DataParallelEngine)."""

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Convenience: add a request and yield its outputs; aborts it if the caller stops early."""
        stream = await self.add_request(request_id, prompt, params, arrival_time)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()


class AsyncLLMEngine(GeneratesFromStreams):
    """Runs a SyncEngine on a background thread and streams its outputs to asyncio callers."""

    def __init__(self, engine: SyncEngine, torch_threads: int | None = None):
        self.engine = engine
        self._torch_threads = torch_threads  # intra-op threads of the engine thread
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._adds_submitted = 0  # written by the loop thread only
        self._adds_applied = 0  # written by the engine thread only
        # (engine stats, adds applied when they were taken): replaced whole, never mutated, by
        # the engine thread, so a reader never counts an add both as pending and as waiting
        self._snapshot: tuple[Any, int] = (None, 0)
        self._consecutive_failures = 0
        self._fatal: BaseException | None = None

    # -- engine facts the server needs ----------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def vocab_size(self) -> int:
        """Token ids the engine accepts are in [0, vocab_size) (the model's, which may be larger
        than the tokenizer's)."""
        return int(getattr(self.engine, "vocab_size", None) or len(self.engine.tokenizer))

    @property
    def stats(self) -> Any:
        """The engine's stats after its latest step (None before the thread started)."""
        return self._snapshot[0]

    @property
    def max_num_seqs(self) -> int | None:
        """How many sequences the engine runs at once (None when the engine does not say)."""
        config = getattr(self.engine, "scheduler_config", None)
        value = getattr(config, "max_num_seqs", None) or getattr(self.engine, "max_num_seqs", None)
        return value if isinstance(value, int) else None

    @property
    def num_queued(self) -> int:
        """Requests accepted but not yet running: the engine's queue plus adds still in flight."""
        stats, applied = self._snapshot
        waiting = getattr(stats, "num_waiting", 0) if stats is not None else 0
        return waiting + self._adds_submitted - applied

    @property
    def num_waiting(self) -> int:
        """Queued requests that will not find a free running slot: the queue beyond
        ``max_num_seqs - running``. (When the KV cache rather than ``max_num_seqs`` is the limit,
        this undercounts by at most the free slots.)"""
        limit = self.max_num_seqs
        if limit is None:
            return self.num_queued
        stats = self._snapshot[0]
        running = getattr(stats, "num_running", 0) if stats is not None else 0
        return max(0, self.num_queued - max(0, limit - running))

    @property
    def num_active(self) -> int:
        return len(self._streams)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def fatal_error(self) -> BaseException | None:
        """Why the engine thread stopped, if it did, or why its executor cannot run any more (a
        worker process died, noticed even while the engine is idle)."""
        if self._fatal is None:
            return getattr(getattr(self.engine, "executor", None), "dead_error", None)
        return self._fatal

    @property
    def is_healthy(self) -> bool:
        return (
            self.is_running
            and self.fatal_error is None
            and self._consecutive_failures < _MAX_CONSECUTIVE_STEP_FAILURES
            and getattr(self.engine, "num_consecutive_failed_steps", 0)
            < _MAX_CONSECUTIVE_STEP_FAILURES
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the streams."""
        if self.is_running:
            return
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="soar-engine", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        self._accepting = False

    def fail_all(self, error: SoarError) -> int:
        """End every open stream with ``error`` and abort its request (on the event loop). The
        streams' readers see the error as the last item, so they can end their responses
        cleanly. Returns how many streams were ended."""
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._put(error)
        self.abort([st.request_id for st in streams])
        return len(streams)

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop taking requests, let the running ones finish for up to ``timeout`` seconds, then
        abort what is left and stop the engine thread."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.fail_all(ServerShuttingDownError(
            "the server is shutting down; the request was aborted before it finished; "
            "retry it (on another replica)"))
        if self._thread is not None:
            self._commands.put(_Stop())
            await asyncio.to_thread(self._thread.join, 30.0)
            self._thread = None

    # -- requests -------------------------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        coalesce: bool = True,
    ) -> RequestStream:
        """Queue a request and return its stream once the engine accepted it.

        Raises the engine's validation errors (InvalidRequestError, ContextLengthError, ...)
        before any output exists, so the caller can answer with a plain 4xx.
        """
        stream, accepted = self.submit_request(request_id, prompt, params, arrival_time, coalesce)
        return await self.wait_accepted(stream, accepted)

    def submit_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        coalesce: bool = True,
    ) -> tuple[RequestStream, asyncio.Future[None]]:
        """The synchronous half of ``add_request`` (on the event loop's thread): the request is
        counted as queued the moment this returns, so an admission check followed by this call,
        with no await between them, cannot be raced by another request."""
        self._check_can_accept()
        if request_id in self._streams:
            raise RequestFailedError(f"request id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:  # engine thread
            self._call_in_loop(_resolve, accepted, error)

        stream = RequestStream(request_id, self._on_stream_closed, coalesce=coalesce)
        self._streams[request_id] = stream
        self._adds_submitted += 1
        self._commands.put(
            _Add(request_id, prompt, params, arrival_time or time.time(), done)
        )
        return stream, accepted

    async def wait_accepted(self, stream: RequestStream,
                            accepted: asyncio.Future[None]) -> RequestStream:
        """The asynchronous half of ``add_request``: wait for the engine to take the request."""
        try:
            await asyncio.shield(accepted)
        except asyncio.CancelledError:
            stream.close()  # aborts it once the engine has it
            raise
        except BaseException:
            self._streams.pop(stream.request_id, None)
            raise
        return stream

    def abort(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests (safe to call from the event loop at any time, idempotent)."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        if ids:
            self._commands.put(_Abort(ids))

    def _check_can_accept(self) -> None:
        if not self._accepting:
            raise OverloadedError("the server is shutting down; retry on another replica")
        if not self.is_healthy:
            raise EngineDeadError(
                "the engine is not running"
                + (f": {self._fatal}" if self._fatal else " (its recent steps failed)")
            )

    def _on_stream_closed(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            self.abort(request_id)

    # -- event-loop side of the hand-off ----------------------------------------------------------

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream._put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream._put(error)

    def _fail_each(self, errors: dict[str, BaseException]) -> None:
        for rid, error in errors.items():
            self._fail([rid], error)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        in_engine: set[str] = set()  # ids added to the engine and not finished (thread-local)
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                commands = self._next_commands(block=idle)
                if any(isinstance(c, _Stop) for c in commands):
                    self._apply([c for c in commands if not isinstance(c, _Stop)], in_engine)
                    self._abort_in_engine(list(in_engine), in_engine)
                    return
                self._apply(commands, in_engine)
                if self.engine.has_unfinished_requests():
                    self._step(in_engine)
                self._publish_stats()
        except BaseException as e:  # a bug in the engine's bookkeeping: report, stop
            logger.exception("engine thread crashed")
            self._fatal = e
            error = (EngineDeadError if getattr(e, "fatal", False) else RequestFailedError)(
                f"the engine crashed: {describe(e)}")
            self._call_in_loop(self._fail, list(in_engine), error)
            for c in self._next_commands(block=False):  # nobody will apply these any more
                if isinstance(c, _Add):
                    c.done(EngineDeadError(f"the engine is not running: {describe(e)}"))

    def _publish_stats(self) -> None:
        self._snapshot = (self.engine.get_stats(), self._adds_applied)

    def _next_commands(self, block: bool) -> list[_Add | _Abort | _Stop]:
        commands: list[_Add | _Abort | _Stop] = []
        if block:
            commands.append(self._commands.get())
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list[_Add | _Abort | _Stop], in_engine: set[str]) -> None:
        aborted = {rid for c in commands if isinstance(c, _Abort) for rid in c.request_ids}
        results: list[tuple[_Add, BaseException | None]] = []
        for add in (c for c in commands if isinstance(c, _Add)):
            try:
                self.engine.add_request(add.request_id, add.prompt, add.params, add.arrival_time)
                in_engine.add(add.request_id)
                results.append((add, None))
            except BaseException as e:  # validation errors go back to the caller as they are
                results.append((add, e))
        if results:
            self._adds_applied += len(results)
            self._publish_stats()  # count them before their callers are told
        for add, error in results:
            add.done(error)
        if aborted:
            self._abort_in_engine(sorted(aborted & in_engine), in_engine)

    def _abort_in_engine(self, request_ids: list[str], in_engine: set[str]) -> None:
        if not request_ids:
            return
        try:
            self.engine.abort_request(request_ids)
        except Exception:
            logger.exception("aborting %d request(s) failed", len(request_ids))
        in_engine.difference_update(request_ids)

    def _step(self, in_engine: set[str]) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            if getattr(e, "fatal", False):  # the executor is gone: _run ends the thread
                raise
            # The engine's own containment did not catch it (its bookkeeping broke): we cannot
            # tell which request is to blame, so fail the ones in flight and keep serving.
            self._consecutive_failures += 1
            failed = sorted(in_engine)
            logger.exception("engine step failed; failing %d in-flight request(s)", len(failed))
            self._abort_in_engine(failed, in_engine)
            self._call_in_loop(
                self._fail, failed,
                RequestFailedError(f"the engine failed while generating: {describe(e)}"),
            )
            return
        # requests the engine failed alone (the others in the step went on)
        take = getattr(self.engine, "take_failures", None)
        failures = take() if take is not None else {}
        self._consecutive_failures = getattr(self.engine, "num_consecutive_failed_steps", 0)
        if self._consecutive_failures >= _MAX_CONSECUTIVE_STEP_FAILURES:
            logger.error("the last %d steps failed for every request; reporting unhealthy",
                         self._consecutive_failures)
        for output in outputs:
            if output.finished:
                in_engine.discard(output.request_id)
        if outputs:
            self._call_in_loop(self._deliver, outputs)
        if failures:
            in_engine.difference_update(failures)
            self._call_in_loop(self._fail_each, failures)


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
