"""The route class of every soarllm router: bodies are parsed by ``json_body`` and a bug in a
handler becomes a 500 answer on a connection that stays open.

Starlette's last-resort handler answers an unhandled exception and then re-raises it, so the
server closes the keep-alive connection and the client's next request on it fails too; catching
it here, inside the route, keeps the failure to the one request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from soarllm.errors import SoarError
from soarllm.serve.errors import internal_error_response
from soarllm.serve.json_body import JSONBodyRequest
from soarllm.serve.streaming import ClientDisconnected

logger = logging.getLogger(__name__)

# Raised on purpose and answered by the app's exception handlers.
_HANDLED = (HTTPException, RequestValidationError, SoarError, ClientDisconnected)


class SoarRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            wrapped = JSONBodyRequest(request.scope, request.receive, request._send)
            try:
                return await handler(wrapped)
            except _HANDLED:
                raise
            except ResponseValidationError as e:
                logger.error("response of %s %s failed validation: %s", request.method,
                             request.url.path, e.errors())
                return internal_error_response(request.url.path, e)
            except Exception as e:
                logger.exception("unhandled error on %s %s", request.method, request.url.path)
                return internal_error_response(request.url.path, e)

        return route_handler
