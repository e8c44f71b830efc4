"""Server-sent events and client-disconnect handling.

``SSEResponse`` streams ``data: ...`` events and, however the response ends (normally, client
disconnect, cancellation at shutdown), calls ``on_close`` so the engine requests behind it are
aborted and their KV blocks freed, even when the body iterator never started.
``until_disconnect`` does the same for a non-streaming handler: if the client goes away while the
result is being computed, the computation is cancelled.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from soarllm.errors import SoarError
from soarllm.serve.errors import tgi_error_body

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def sse_event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


class ClientDisconnected(Exception):
    pass


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None],
                 headers: dict[str, str] | None = None):
        super().__init__(content, headers={**SSE_HEADERS, **(headers or {})},
                         media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            try:
                if aclose is not None:
                    await asyncio.shield(aclose())
            except Exception:
                pass
            finally:
                self._on_close()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise ClientDisconnected()
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def stream_error_payload(exc: SoarError, tgi: bool = False) -> dict[str, Any]:
    """The event that ends a stream which failed after it started (status is already 200)."""
    if tgi:
        return tgi_error_body(exc.message, exc.error_type)
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param,
                      "code": exc.status_code}}
