"""Bearer-token authentication (ASGI middleware) over one or many API keys.

With keys every route needs one except /health (probes carry no secrets), the playground page at
/ (a static page with no data; every call it makes sends the key typed into it), and /metrics
when the operator opens it to scrapers; /docs and /openapi.json included, since they name the
model. Tokens are looked up by their SHA-256 digest, so the time a lookup takes says nothing
about any key, however many keys there are. The key that matched is the caller
(soarllm.serve.usage) for the rest of the request: usage and rate limits are charged to its name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from soarllm.serve.config import ApiKey
from soarllm.serve.errors import error_body_for
from soarllm.serve.usage import ANONYMOUS, Caller, acting_as

OPEN_PATHS = frozenset({"/health"})
# GET only: POST / is TGI's generation route and keeps needing a key
OPEN_PAGES = frozenset({"/"})


def protected_paths(public_metrics: bool = False) -> Callable[[str], bool]:
    """Which paths need a key: all but /health (and /metrics if ``public_metrics``); the
    playground page (GET / only) is opened by the middleware itself."""
    open_paths = OPEN_PATHS | ({"/metrics"} if public_metrics else set())

    def protected(path: str) -> bool:
        return path not in open_paths

    return protected


is_protected = protected_paths()


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison independent of the key's length as well.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None = None,
                 protected: Callable[[str], bool] = is_protected,
                 keys: list[ApiKey] | None = None):
        self.app = app
        keys = list(keys or []) + ([ApiKey("key-1", api_key)] if api_key else [])
        if not keys:
            raise ValueError("BearerAuthMiddleware needs at least one key")
        self._callers = {_digest(k.secret): Caller(k.name, k.admin) for k in keys}
        self._protected = protected

    def caller(self, scope: Scope) -> Caller | None:
        """The key the request's bearer token is, or None."""
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self._callers.get(_digest(token.strip()))

    def authorized(self, scope: Scope) -> bool:
        return self.caller(scope) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        who = self.caller(scope)
        if who is not None:
            with acting_as(who):
                await self.app(scope, receive, send)
            return
        if not self._protected(scope["path"]) or (
                scope["path"] in OPEN_PAGES and scope.get("method") in ("GET", "HEAD")):
            with acting_as(Caller(ANONYMOUS)):
                await self.app(scope, receive, send)
            return
        path = scope["path"]
        body = error_body_for(
            path, 401, "missing or invalid API key; send the header "
            "'Authorization: Bearer <key>' with a key the server was started with",
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
