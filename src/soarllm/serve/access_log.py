"""Structured access logs (one JSON object per request) and HTTP request counters."""

from __future__ import annotations

import json
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from soarllm.serve.metrics import ServerMetrics

ACCESS_LOGGER = "soarllm.access"
REQUEST_ID_HEADER = b"x-request-id"


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics, enabled: bool = True):
        self.app = app
        self.metrics = metrics
        self.enabled = enabled
        self.logger = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers", []))
        request_id = headers.get(REQUEST_ID_HEADER, b"").decode("latin-1")[:128] \
            or uuid.uuid4().hex
        status = 500
        sent = 0
        first_byte: float | None = None

        async def logging_send(message: Message) -> None:
            nonlocal status, sent, first_byte
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [
                    *message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]}
            elif message["type"] == "http.response.body":
                if first_byte is None:
                    first_byte = time.perf_counter()
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "<unmatched>"
            self.metrics.observe_http(scope["method"], path, status)
            if self.enabled:
                client = scope.get("client")
                self.logger.info(json.dumps({
                    "event": "http_request",
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "request_id": request_id,
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    "ttfb_ms": round((first_byte - start) * 1000, 2) if first_byte else None,
                    "bytes_sent": sent,
                    "user_agent": headers.get(b"user-agent", b"").decode("latin-1")[:200],
                }))
