"""User-facing errors. Each message says what to change.

The server maps each class to an HTTP status and an OpenAI-style error body; offline callers
get the exception itself.
"""

from __future__ import annotations


class SoarError(Exception):
    """Base class of every error soarllm raises on purpose."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(SoarError, ValueError):
    """The request is malformed or asks for something impossible (HTTP 400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens do not fit in max_model_len (HTTP 400)."""


class RequestTooLargeError(SoarError):
    """The request body itself is too large (HTTP 413)."""

    status_code = 413
    error_type = "invalid_request_error"


class AuthenticationError(SoarError):
    status_code = 401
    error_type = "authentication_error"


class ModelNotFoundError(SoarError, LookupError):
    """Unknown model name or path (HTTP 404)."""

    status_code = 404
    error_type = "not_found_error"


class OverloadedError(SoarError):
    """Too many waiting requests; retry later (HTTP 503 with Retry-After)."""

    status_code = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitError(SoarError):
    status_code = 429
    error_type = "rate_limit_error"


class ConfigError(SoarError, ValueError):
    """An engine or model setting is impossible (bad dtype, KV cache too small, ...)."""

    status_code = 400
    error_type = "invalid_request_error"


class UnsupportedModelError(ConfigError):
    """The checkpoint's architecture has no native implementation."""
