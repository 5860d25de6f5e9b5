"""Anthropic's error body, ``{"type": "error", "error": {"type": ..., "message": ...}}``, which the Messages API's
routes (``MESSAGES_PATHS``) answer with instead of OpenAI's: the server's error handlers, guards and drain ask
:func:`is_messages_path` which shape a refusal takes. This module imports nothing of the server, so every layer
that writes errors can use it."""

from __future__ import annotations

from typing import Any

MESSAGES_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
"""The routes of Anthropic's Messages API (as routes match them: without ``--root-path``)."""

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors); 503 is this server's "busy or
# shutting down", which Anthropic calls overloaded (its own status for that is 529).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def is_messages_path(path: str | None) -> bool:
    """Whether a request to ``path`` (a route's path, without ``--root-path``) is answered in Anthropic's shape."""
    return path in MESSAGES_PATHS


def error_type(status: int) -> str:
    """Anthropic's ``error.type`` for an HTTP status (other 4xx: ``invalid_request_error``; other 5xx:
    ``api_error``)."""
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """The body of an error answer (or of a stream's ``error`` event) with this status and message."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}
