"""Bearer-token authentication (ASGI middleware, constant-time compare).

With a key every route needs it except /health (probes carry no secrets), and /metrics when the
operator opens it to scrapers; /docs and /openapi.json included, since they name the model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from soarllm.serve.errors import error_body_for

OPEN_PATHS = frozenset({"/health"})


def protected_paths(public_metrics: bool = False) -> Callable[[str], bool]:
    """Which paths need the key: all but /health (and /metrics if ``public_metrics``)."""
    open_paths = OPEN_PATHS | ({"/metrics"} if public_metrics else set())

    def protected(path: str) -> bool:
        return path not in open_paths

    return protected


is_protected = protected_paths()


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison independent of the key's length as well.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str,
                 protected: Callable[[str], bool] = is_protected):
        self.app = app
        self._key_digest = _digest(api_key)
        self._protected = protected

    def authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        return hmac.compare_digest(_digest(token.strip()), self._key_digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" \
                or not self._protected(scope["path"]) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        body = error_body_for(
            path, 401, "missing or invalid API key; send the header "
            "'Authorization: Bearer <key>' with the key the server was started with",
            "authentication_error",
        )
        if "error" in body and isinstance(body["error"], dict):
            body["error"]["code"] = "invalid_api_key"
        payload = json.dumps(body).encode()
        await send({
            "type": "http.response.start", "status": 401,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                        (b"www-authenticate", b"Bearer")],
        })
        await send({"type": "http.response.body", "body": payload})
