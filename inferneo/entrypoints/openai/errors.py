"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``, and the handlers that send them.

The routes of Anthropic's Messages API answer in Anthropic's shape instead (``anthropic.errors``): every writer of
an error body passes the request's route path to :func:`error_body`, which picks the shape."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferneo.engine.async_engine import (
    EngineBusyError,
    EngineDeadError,
    EngineSleepingError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
)
from inferneo.entrypoints.anthropic.errors import anthropic_error_body, is_messages_path
from inferneo.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error to send to the client as-is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self, path: str | None = None) -> dict[str, Any]:
        """The error's body, in the shape of the route ``path`` (None: OpenAI's)."""
        return error_body(self.status, self.message, self.param, self.code, path)

    def response(self, path: str | None = None) -> JSONResponse:
        return JSONResponse(self.body(path), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               path: str | None = None) -> dict[str, Any]:
    """An error's body: OpenAI's shape, or Anthropic's for a route of the Messages API (``path``, the route's path
    without ``--root-path``; None: OpenAI's)."""
    if is_messages_path(path):
        return anthropic_error_body(status, message)
    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def renamed(error: APIError, old: str, new: str) -> APIError:
    """``error`` naming field ``old`` as ``new``, the name the client gave the same setting: in its ``param`` (when
    that is ``old``) and wherever its message names ``old`` as a whole word (the engine's checks name the sampling
    parameter, e.g. ``max_tokens``, which a chat request may have sent as ``max_completion_tokens``)."""
    message = re.sub(rf"(?<![\w.]){re.escape(old)}(?!\w)", new, error.message)
    if message == error.message and error.param != old:
        return error
    return APIError(error.status, message, new if error.param == old else error.param, error.code, error.headers)


def to_api_error(exc: BaseException) -> APIError:
    """The client-facing error for anything raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        message = str(exc)
        if exc.param and exc.param not in message:
            message = f"{exc.param}: {message}"
        return APIError(400, message, exc.param)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineSleepingError):
        return APIError(503, str(exc), code="engine_sleeping", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineBusyError):
        return APIError(409, str(exc), code="engine_busy")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), code="engine_error")
    if isinstance(exc, ValueError):  # SamplingParams and the engine name the field first: "top_p must be ..."
        message = str(exc)
        first = message.split(" ", 1)[0]
        return APIError(400, message, first if first in SamplingParams.__dataclass_fields__ else None)
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal server error: {exc!r}", code="internal_error")


def _param_from_loc(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text:
            text += f".{part}"
        else:
            text = str(part)
    return text


# The strict request models (protocol.py) refuse a value of the wrong JSON type with these pydantic error types.
_EXPECTED = {
    "bool_type": "a boolean",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _json_kind(value: Any) -> str:
    """What a decoded JSON value is, in the words of the OpenAI API's type errors."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def validation_message(error: dict) -> tuple[str, str | None]:
    """The client-facing message and ``param`` of one pydantic validation error (an entry of ``errors()``)."""
    param = _param_from_loc(tuple(error.get("loc", ())))
    kind = error.get("type", "")
    if kind in _EXPECTED and param is not None:
        return f"{param}: expected {_EXPECTED[kind]}, but got {_json_kind(error.get('input'))} instead", param
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {error.get('msg')}", None
    if kind == "missing" and param is None:
        return "the request body is missing; send a JSON object", None
    message = str(error.get("msg", "invalid request" if param is None else "invalid value")).removeprefix("Value error, ")
    if param is None:  # a whole-request check (a model validator)
        return message, None
    return f"{param}: {message}", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server in the OpenAI shape (validation errors as 400, not FastAPI's 422)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(_route_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message, param = validation_message(errors[0]) if errors else ("invalid request", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(error_body(400, message, param, path=_route_of(request)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message, path=_route_of(request)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response(_route_of(request))


def _route_of(request: Request) -> str | None:
    """The path of the route a request matched, fully or by its path alone (a 405; None when it matched none),
    which decides its errors' shape."""
    return getattr(request.scope.get("route"), "path", None)
