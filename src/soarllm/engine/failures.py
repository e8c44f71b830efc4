"""Errors for requests the engine could not finish through no fault of the client.

They are raised to the caller of a request (offline) or put into its stream (serving), and map to
500-class HTTP answers with OpenAI's error shape.
"""

from __future__ import annotations

from soarllm.errors import SoarError


class RequestFailedError(SoarError):
    """The engine failed while running this request (HTTP 500, not the client's fault)."""

    status_code = 500
    error_type = "internal_error"


class EngineDeadError(SoarError):
    """The engine thread stopped or keeps failing; the server cannot take requests (HTTP 503)."""

    status_code = 503
    error_type = "engine_error"


class ServerShuttingDownError(RequestFailedError):
    """The server stopped before the request finished; retry on another replica (HTTP 503)."""

    status_code = 503
    error_type = "service_unavailable_error"


def describe(error: BaseException) -> str:
    """``TypeName: message``, short enough for an error body."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
