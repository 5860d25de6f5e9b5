"""The client's exceptions: one tree under :class:`InferneoError`.

::

    InferneoError
    └── APIError                      the server could not be reached, or answered with an error
        ├── APIConnectionError        no answer (refused, reset, DNS, ...)
        │   └── APITimeoutError       no answer in time
        └── APIStatusError            an HTTP error status; ``.status_code``, ``.response``
            ├── BadRequestError           400
            ├── AuthenticationError       401
            ├── PermissionDeniedError     403
            ├── NotFoundError             404
            ├── ConflictError             409
            ├── UnprocessableEntityError  422
            ├── RateLimitError            429
            └── InternalServerError       >= 500
    └── UnsendableRequestError        a request JSON cannot carry (a lone surrogate, NaN); never sent
    └── StructuredOutputError         an answer that does not parse or validate as the format asked for
        └── LengthFinishReasonError   ... because it was cut off at max_tokens
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InferneoError",
    "InternalServerError",
    "LengthFinishReasonError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "StructuredOutputError",
    "UnprocessableEntityError",
    "UnsendableRequestError",
]


class InferneoError(Exception):
    """The base of every exception the client raises."""


class APIError(InferneoError):
    """The request failed. ``body`` is the server's error object (``{"message", "type", "param", "code"}``) when
    it sent one; ``message``, ``type``, ``param`` and ``code`` are read from it."""

    def __init__(self, message: str, request: httpx.Request | None = None, *, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body
        error = body if isinstance(body, dict) else {}
        self.type: str | None = error.get("type")
        self.param: str | None = error.get("param")
        self.code: str | None = error.get("code")


class UnsendableRequestError(InferneoError, ValueError):
    """A request the client cannot send, because JSON cannot carry a value of it: a string with a lone surrogate
    (half of a UTF-16 pair, e.g. ``"\\ud800"``), or a float that is NaN or infinite. Nothing was sent; ``param``
    names the field that holds the value (``prompt``, ``messages``, ``temperature``, ...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke before an answer came."""

    def __init__(self, message: str = "Connection error.", request: httpx.Request | None = None) -> None:
        super().__init__(message, request)


class APITimeoutError(APIConnectionError):
    """No answer came within the timeout."""

    def __init__(self, request: httpx.Request | None = None, message: str = "Request timed out.") -> None:
        super().__init__(message, request)


class APIStatusError(APIError):
    """The server answered with an HTTP error status (4xx or 5xx)."""

    status_code: int

    def __init__(self, message: str, response: httpx.Response, *, body: Any = None) -> None:
        super().__init__(message, response.request, body=body)
        self.response = response
        self.status_code = response.status_code

    def __str__(self) -> str:
        return f"Error code: {self.status_code} - {self.message}"


class BadRequestError(APIStatusError):
    """400: the request is invalid (``param`` names the field when the server could tell)."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404: an unknown model or route."""


class ConflictError(APIStatusError):
    """409."""


class UnprocessableEntityError(APIStatusError):
    """422."""


class RateLimitError(APIStatusError):
    """429: the server's queue is full; the client waits ``Retry-After`` and tries again."""


class InternalServerError(APIStatusError):
    """5xx: the server or its engine failed."""


class StructuredOutputError(InferneoError):
    """An answer asked for in a structured format (a pydantic model, a JSON schema) that does not parse or
    validate as one: ``content`` is what the model wrote, ``finish_reason`` why it stopped, ``index`` the
    choice's index, and ``__cause__`` the JSON or validation error when there is one."""

    def __init__(self, message: str, *, content: str | None, finish_reason: str | None, index: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.content = content
        self.finish_reason = finish_reason
        self.index = index


class LengthFinishReasonError(StructuredOutputError):
    """The structured answer was cut off by ``max_tokens`` (or the context length) before it was complete:
    raise ``max_tokens``, or bound the schema's strings and arrays (``maxLength``, ``maxItems``)."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error(response: httpx.Response) -> APIStatusError:
    """The exception for an error response whose body has been read."""
    body: Any = None
    message = ""
    try:
        data = response.json()
    except ValueError:
        message = response.text.strip()
    else:
        body = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(body, dict):
            message = str(body.get("message") or "")
        if not message:
            message = str(data)
    message = message or response.reason_phrase or f"HTTP {response.status_code}"
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    return cls(message, response, body=body)
