"""The server's guards: request limits, API keys, CORS and request logging, as one ASGI middleware.

``install_guards(app, ctx, guards)`` puts them in front of the routes. Each request is checked, in this order:

1. the API key (``ctx.api_keys``): every path but ``/health``, ``/version``, the API docs (``/openapi.json``,
   ``/docs``, ``/redoc``) (and ``/metrics`` with ``metrics_public``) needs ``Authorization: Bearer <key>`` (or,
   without that header, Anthropic's ``x-api-key: <key>``); keys are compared in constant time;
2. the body size (``Content-Length`` first, then the bytes that actually arrive): 413 over ``max_body_bytes``.
   So that a client that sends its whole body before it reads the answer (most HTTP clients) reads the 413
   rather than a connection reset, the answer is sent first and the rest of the body is then read and thrown
   away (up to ``DISCARD_MAX_BYTES`` more, within ``DISCARD_MAX_SECONDS``) before the connection is closed. A
   request with ``Expect: 100-continue`` whose ``Content-Length`` is over the limit is answered at once: the
   server says ``100 Continue`` only when the body is first read, so such a client never sends the body;
3. for the JSON endpoints, the body itself: not compressed (a ``Content-Encoding`` other than ``identity`` gets
   415), valid UTF-8 and JSON, nested no deeper than ``max_json_depth``, at
   most ``max_prompts`` prompts (or conversations), ``n`` up to ``max_n``, prompts × ``n`` up to ``max_seqs``
   and ``max_tokens`` no larger than the context length; then its ``Content-Type``: ``application/json`` (or
   ``+json``, or none), else 415;
4. a deadline (``request_timeout``): past it the request is cancelled (its engine work aborted) and the client
   gets 503 with ``Retry-After`` (or, mid-stream, a last error event).

Everything refused gets the OpenAI error shape (Anthropic's on the Messages API's routes: ``errors.error_body``). The checks of step 3 look only at the fields they limit; the
request models in ``protocol.py`` validate the rest. This module imports no web framework at import time, so the
command line can add its flags cheaply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from inferneo import json_text
from inferneo.entrypoints.anthropic.errors import is_messages_path
from inferneo.entrypoints.openai.request_log import shorten_prompts
from inferneo.json_text import TooDeep, loads_bounded

logger = logging.getLogger(__name__)

MiB = 2**20
PUBLIC_PATHS = frozenset({"/health", "/ping", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
CORS_METHODS = ["GET", "POST"]  # what a cross-origin request may use unless --allowed-methods says otherwise
CORS_HEADERS = ["Authorization", "Content-Type"]  # the request headers it may send, unless --allowed-headers
JSON_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/tokenize",
                        "/detokenize", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/classify",
                        "/v1/classify", "/invocations", "/v1/messages", "/v1/messages/count_tokens"})
# The field holding a request's prompts, by path (a list of them counts against max_prompts); others: messages.
_PROMPT_FIELDS = {"/v1/completions": "prompt", "/v1/embeddings": "input", "/v1/responses": None,  # None: one
                  "/score": "text_2", "/v1/score": "text_2", "/rerank": "documents", "/v1/rerank": "documents",
                  "/v2/rerank": "documents", "/classify": "input", "/v1/classify": "input"}
# ``POST /invocations`` (SageMaker's one endpoint, ``invocations.py``): the fields that say what a body is, in the
# order they are tried, with the field that holds its prompts
INVOCATION_KINDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("messages",), "messages"), (("prompt",), "prompt"), (("query", "documents"), "documents"),
    (("text_1", "text_2"), "text_2"), (("input",), "input"))
_LOGGED_CHARS = 2000  # with log_requests, how much of a body one log line shows
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff: only valid as a pair

DISCARD_MAX_BYTES = 64 * MiB
"""How much more of an oversized body the server reads and throws away after its 413, so that a client that sends
the whole body before reading the answer can read it. A body declared (``Content-Length``) larger than this past
what was read is not read: the connection is closed after the answer (a client reading as it sends still sees
it)."""
DISCARD_MAX_SECONDS = 30.0
"""How long the server keeps reading and throwing away an oversized body after its 413."""


@dataclass(slots=True)
class ServerGuards:
    """Limits and security settings of the HTTP server; the defaults suit a small server on one machine."""

    max_body_bytes: int = 4 * MiB
    max_upload_bytes: int = 512 * MiB  # a file uploaded to /v1/files (a batch's input) instead of max_body_bytes
    max_prompts: int = 256
    max_n: int = 128
    max_seqs: int = 1024
    max_json_depth: int = json_text.MAX_DEPTH
    request_timeout: float | None = 600.0
    metrics_public: bool = False
    allowed_origins: list[str] = field(default_factory=list)
    allowed_methods: list[str] = field(default_factory=lambda: list(CORS_METHODS))
    allowed_headers: list[str] = field(default_factory=lambda: list(CORS_HEADERS))
    allow_credentials: bool = False
    log_requests: bool = False
    max_log_len: int | None = None  # with log_requests: prompts cut to this many characters (or token ids)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_upload_bytes", "max_prompts", "max_n", "max_seqs", "max_json_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"--max-log-len must be at least 0, got {self.max_log_len}")


def add_guard_args(group: argparse._ArgumentGroup) -> None:
    """The ``inferneo serve`` flags for ``ServerGuards``."""
    d = ServerGuards()
    group.add_argument("--max-request-body-bytes", type=int, default=d.max_body_bytes,
                       help=f"refuse larger request bodies with 413 (default {d.max_body_bytes})")
    group.add_argument("--max-prompts-per-request", type=int, default=d.max_prompts,
                       help=f"prompts (or conversations) one request may carry (default {d.max_prompts})")
    group.add_argument("--max-n", type=int, default=d.max_n,
                       help=f"the largest n a request may ask (default {d.max_n}, also the API's ceiling)")
    group.add_argument("--max-seqs-per-request", type=int, default=d.max_seqs,
                       help=f"the most sequences (prompts x n) one request may start (default {d.max_seqs})")
    group.add_argument("--request-timeout", type=float, default=d.request_timeout,
                       help=f"seconds a request may take before it is aborted with 503 (default {d.request_timeout:g};"
                       " 0 for none)")
    group.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    group.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                       help="allow cross-origin (CORS) requests from these origins ('*' for any), given one by one "
                       "or as vLLM's JSON list ('[\"https://a.example\"]'); default: none (CORS off)")
    group.add_argument("--allowed-methods", nargs="+", default=None, metavar="METHOD",
                       help="with --allowed-origins: the HTTP methods cross-origin requests may use ('*' for any; "
                       f"a JSON list too); default: {' '.join(CORS_METHODS)}")
    group.add_argument("--allowed-headers", nargs="+", default=None, metavar="HEADER",
                       help="with --allowed-origins: the request headers cross-origin requests may send ('*' for "
                       f"any; a JSON list too); default: {' '.join(CORS_HEADERS)}")
    group.add_argument("--allow-credentials", action="store_true",
                       help="with --allowed-origins: let browsers send cross-origin requests with credentials "
                       "(cookies, HTTP authentication): answers carry Access-Control-Allow-Credentials: true")
    group.add_argument("--log-requests", "--enable-log-requests", action="store_true", dest="log_requests",
                       help="log request and response bodies (prompts and outputs); off by default")
    group.add_argument("--max-log-len", type=int, default=None, metavar="N",
                       help="with --log-requests: cut each prompt in the logged request bodies to N characters (a "
                       "token-id prompt to N ids); default: prompts whole (a logged body is still cut at "
                       f"{_LOGGED_CHARS} characters)")
    group.add_argument("--disable-log-requests", action="store_true",
                       help="accepted so that vLLM command lines run unchanged: bodies are logged only with "
                       "--log-requests")


def guards_from_args(args: argparse.Namespace) -> ServerGuards:
    """``ServerGuards`` from the flags ``add_guard_args`` added."""
    if args.log_requests and args.disable_log_requests:
        raise ValueError("--log-requests (or --enable-log-requests) and --disable-log-requests contradict each other")
    origins = _cli_list(args.allowed_origins, "--allowed-origins") or []
    methods = _cli_list(args.allowed_methods, "--allowed-methods")
    headers = _cli_list(args.allowed_headers, "--allowed-headers")
    if not origins and (methods is not None or headers is not None or args.allow_credentials):
        logger.warning("--allowed-methods, --allowed-headers and --allow-credentials take effect with "
                       "--allowed-origins, which is not given: CORS stays off (vLLM allows every origin by default; "
                       "this server none)")
    return ServerGuards(
        max_body_bytes=args.max_request_body_bytes, max_prompts=args.max_prompts_per_request, max_n=args.max_n,
        max_seqs=args.max_seqs_per_request, request_timeout=args.request_timeout or None,
        metrics_public=args.metrics_public, allowed_origins=origins,
        allowed_methods=CORS_METHODS if methods is None else methods,
        allowed_headers=CORS_HEADERS if headers is None else headers,
        allow_credentials=args.allow_credentials, log_requests=args.log_requests, max_log_len=args.max_log_len,
    )


def _cli_list(values: list[str] | None, flag: str) -> list[str] | None:
    """A list flag's values: given one by one, or (vLLM's form) as one JSON list of strings."""
    if values is None or len(values) != 1 or not values[0].lstrip().startswith("["):
        return values
    try:
        parsed = json.loads(values[0])
    except ValueError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise ValueError(f"{flag}: {values[0]!r} is not a JSON list of strings (give the values one by one, or "
                         "as '[\"a\", \"b\"]')")
    return parsed


def api_keys_from_env(keys: list[str] | None) -> list[str]:
    """The given keys, else those in ``$INFERNEO_API_KEY`` (several may be separated by commas)."""
    if keys:
        return list(keys)
    return [k.strip() for k in os.environ.get("INFERNEO_API_KEY", "").split(",") if k.strip()]


def install_guards(app: Any, ctx: Any, guards: ServerGuards | None = None) -> None:
    """Put the guards (and, with ``allowed_origins``, CORS) in front of ``app``'s routes; call before it starts."""
    guards = guards or ServerGuards()
    app.add_middleware(GuardMiddleware, ctx=ctx, guards=guards)
    if guards.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=guards.allowed_origins, allow_methods=guards.allowed_methods,
                           allow_headers=guards.allowed_headers, allow_credentials=guards.allow_credentials,
                           max_age=600)


def invocation_kind(body: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
    """The entry of :data:`INVOCATION_KINDS` an ``/invocations`` body is (the first whose fields it has)."""
    return next((kind for kind in INVOCATION_KINDS if all(name in body for name in kind[0])), None)


def route_path(scope: dict[str, Any]) -> str:
    """The path a request's route is matched on: the request's path without the ``root_path`` a reverse proxy
    stripped (``--root-path``), which the ASGI server keeps in front of ``path``."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class Refusal(Exception):
    """A request the guards turn away."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, unread: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        # Bytes of the body still to come when the request is refused (-1: unknown), if the server should read and
        # throw them away after answering; None when nothing is to be read.
        self.unread = unread


class GuardMiddleware:
    """The ASGI middleware ``install_guards`` adds (see the module docstring for what it checks)."""

    def __init__(self, app: Any, ctx: Any, guards: ServerGuards) -> None:
        self.app = app
        self.ctx = ctx
        self.guards = guards
        self.keys = [k.encode() for k in getattr(ctx, "api_keys", None) or []]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = _Exchange(send, self.guards.log_requests, route_path(scope))
        work = self._handle(scope, receive, state)
        try:
            if self.guards.request_timeout is None:
                await work
            else:
                await asyncio.wait_for(work, self.guards.request_timeout)
        except Refusal as refusal:
            await state.refuse(refusal, receive)
        except asyncio.TimeoutError:
            await state.time_out(self.guards.request_timeout)
        if self.guards.log_requests:
            state.log_response(scope)

    async def _handle(self, scope: dict, receive: Any, state: _Exchange) -> None:
        path = route_path(scope)
        if self.keys and not self._is_public(path):
            self._check_key(scope)
        body = None
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive, self.guards.max_upload_bytes if path == "/v1/files"
                                         else self.guards.max_body_bytes)
            if body is None:
                return  # the client left while sending
            if path in JSON_PATHS and scope["method"] == "POST":
                _check_content_encoding(scope)
                self._check_json(path, body)
                _check_content_type(scope)
            if self.guards.log_requests:
                text = body.decode("utf-8", "replace")
                if self.guards.max_log_len is not None and path in JSON_PATHS:
                    text = shorten_prompts(text, self.guards.max_log_len)
                logger.info("request %s %s: %s", scope["method"], path, _shorten(text))
            receive = _replay(body, receive)
        await self.app(scope, receive, state.send)

    def _is_public(self, path: str) -> bool:
        return path in PUBLIC_PATHS or (path == "/metrics" and self.guards.metrics_public)

    def _check_key(self, scope: dict) -> None:
        bearer = x_api_key = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and not bearer:
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    bearer = token.strip()
            elif name == b"x-api-key" and not x_api_key:  # Anthropic's header (its SDK and Claude Code send it)
                x_api_key = value.strip()
        given = bearer or x_api_key  # the bearer token, else Anthropic's header
        ok = False
        for key in self.keys:  # every key is compared, each in constant time
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise Refusal(401, "Missing or invalid API key: send 'Authorization: Bearer <key>' (or 'x-api-key: "
                               "<key>')", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope: dict, receive: Any, limit: int) -> bytes | None:
        declared, expects_continue = None, False
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                declared = int(value)
            elif name == b"expect" and value.lower() == b"100-continue":
                expects_continue = True
        if declared is not None and declared > limit:
            # With Expect: 100-continue nothing has been sent yet (the server has not read, so it has not said
            # "100 Continue"): answer now and read nothing. Otherwise the body is on its way: read and drop it.
            raise _too_large(declared, limit, unread=None if expects_continue else declared)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                more = message.get("more_body", False)
                raise _too_large(size, limit, at_least=True, unread=-1 if more else None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check_json(self, path: str, body: bytes) -> None:
        if not body.strip():
            raise Refusal(400, "the request body is empty; send a JSON object")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Refusal(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
        try:
            data = loads_bounded(text, self.guards.max_json_depth)
        except TooDeep:
            raise _too_deep(self.guards.max_json_depth) from None
        except ValueError as exc:
            raise Refusal(400, f"the request body is not valid JSON: {exc}") from None
        if _SURROGATE_ESCAPE.search(body):
            try:  # JSON may escape half of a surrogate pair alone; such a string is no Unicode text
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise Refusal(400, "the request body has a string with an unpaired surrogate escape "
                                   "(\\ud800-\\udfff), which is not valid Unicode text") from None
        if isinstance(data, dict) and path == "/invocations":
            kind = invocation_kind(data)
            self._check_sizes(data, "messages" if kind is None else kind[1])
        elif isinstance(data, dict) and (path.startswith("/v1/") or path in _PROMPT_FIELDS):
            self._check_sizes(data, _PROMPT_FIELDS.get(path, "messages"))

    def _check_sizes(self, data: dict, field_name: str) -> None:
        g = self.guards
        count = _num_prompts(data.get(field_name), field_name)
        if field_name == "prompt" and (embeds := data.get("prompt_embeds")):  # prompts given as embeddings count too
            count = (0 if data.get("prompt") in (None, "") else count) + (len(embeds) if isinstance(embeds, list)
                                                                          else 1)
        what = "conversations" if field_name == "messages" else "prompts"
        if count > g.max_prompts:
            raise Refusal(400, f"{field_name}: {count} {what} in one request; this server takes at most "
                               f"{g.max_prompts} (send them in several requests)", field_name)
        n = data.get("n")
        if _is_int(n):
            if n > g.max_n:
                raise Refusal(400, f"n: {n} is more than this server allows ({g.max_n})", "n")
            if n >= 1 and count * n > g.max_seqs:
                raise Refusal(400, f"n: {count} {what} x n={n} would start {count * n} sequences; this server "
                                   f"starts at most {g.max_seqs} for one request", "n")
        context = getattr(getattr(self.ctx, "engine", None), "max_model_len", None)
        for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = data.get(name)
            if _is_int(value) and context and value > context:
                raise Refusal(400, f"{name}: {value} is more than the model's context length ({context} tokens, "
                                   "prompt included)", name)


class _Exchange:
    """The response side of one request: what has been sent, so a refusal or a timeout can still answer well."""

    def __init__(self, send: Any, keep_body: bool, path: str | None = None) -> None:
        self._send = send
        self.path = path  # the route path, which decides the shape of the error bodies (errors.error_body)
        self.started = False
        self.finished = False
        self.stream = False
        self.status = 0
        self.keep_body = keep_body
        self.body = bytearray()

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            self.stream = any(k == b"content-type" and v.startswith(b"text/event-stream")
                              for k, v in message.get("headers", []))
        elif message["type"] == "http.response.body":
            if self.keep_body and len(self.body) < _LOGGED_CHARS:
                self.body += message.get("body", b"")[:_LOGGED_CHARS]
            if not message.get("more_body", False):
                self.finished = True
        await self._send(message)

    async def refuse(self, refusal: Refusal, receive: Any = None) -> None:
        """Answer ``refusal``; with its ``unread`` set (and ``receive`` given), send the answer, then read and throw
        away the rest of the body (within the ``DISCARD_*`` bounds), then end the response."""
        if self.started:  # cannot happen for the checks above, which all run before the app answers
            return
        from inferneo.entrypoints.openai.errors import error_body

        payload = json.dumps(error_body(refusal.status, refusal.message, refusal.param, refusal.code,
                                        self.path)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (refusal.headers or {}).items()]
        if refusal.status == 413:
            headers.append((b"connection", b"close"))
        await self.send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        discard = refusal.unread is not None and receive is not None and refusal.unread <= DISCARD_MAX_BYTES
        await self.send({"type": "http.response.body", "body": payload, "more_body": discard})
        if discard:
            # The answer is out (a client that reads while it sends stops here); now let a client that sends all
            # first finish, so that closing the connection does not reset it before the answer is read.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_discard(receive, DISCARD_MAX_BYTES), DISCARD_MAX_SECONDS)
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def time_out(self, seconds: float | None) -> None:
        message = (f"the request did not finish within this server's limit of {seconds:g} s (--request-timeout) "
                   "and was aborted; retry later, or ask for fewer tokens")
        refusal = Refusal(503, message, code="request_timeout", headers={"Retry-After": "5"})
        if not self.started:
            await self.refuse(refusal)
        elif not self.finished:
            tail = b""
            if self.stream:
                from inferneo.entrypoints.openai.errors import error_body

                event = json.dumps(error_body(503, message, code="request_timeout", path=self.path))
                if is_messages_path(self.path):  # Anthropic's stream: a named error event, no [DONE]
                    tail = f"event: error\ndata: {event}\n\n".encode()
                else:
                    tail = f"data: {event}\n\ndata: [DONE]\n\n".encode()
            await self.send({"type": "http.response.body", "body": tail, "more_body": False})

    def log_response(self, scope: dict) -> None:
        logger.info("response %s %s: %d %s", scope["method"], scope["path"], self.status,
                    _shorten(bytes(self.body).decode("utf-8", "replace")))


async def _discard(receive: Any, budget: int) -> None:
    """Read and drop the rest of a request body, at most ``budget`` bytes, until it ends or the client leaves."""
    while budget >= 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b""))


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands the app the body already read, then passes on to the real one (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _too_large(size: int, limit: int, at_least: bool = False, unread: int | None = None) -> Refusal:
    amount = f"more than {limit}" if at_least else str(size)
    return Refusal(413, f"the request body is too large: {amount} bytes; this server takes at most {limit} bytes "
                        "(--max-request-body-bytes)", code="request_too_large", unread=unread)


def _check_content_type(scope: dict) -> None:
    """415 for a JSON body sent under another media type (``curl -d`` without a header sends a form's): the route
    would read it as bytes, not JSON. No ``Content-Type`` at all is read as JSON."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            if media != b"application/json" and not (media.startswith(b"application/") and media.endswith(b"+json")):
                shown = media.decode("latin-1") or "an empty value"
                raise Refusal(415, f"the request body is JSON but its Content-Type is {shown}; send it as "
                                   "'Content-Type: application/json' (with curl: -H 'Content-Type: application/json')",
                              code="unsupported_media_type")
            return


def _check_content_encoding(scope: dict) -> None:
    """415 for a compressed body (``Content-Encoding: gzip``, ...): the server reads bodies as sent, so a compressed
    one would be refused as invalid UTF-8 or JSON, which hides the reason."""
    for name, value in scope["headers"]:
        if name == b"content-encoding":
            codings = [c.strip().lower() for c in value.split(b",") if c.strip()]
            if any(c != b"identity" for c in codings):
                shown = value.decode("latin-1").strip()[:40]
                raise Refusal(415, f"the request body is encoded ({shown}); this server takes uncompressed JSON: "
                                   "send it without Content-Encoding", code="unsupported_media_type",
                              headers={"Accept-Encoding": "identity"})


def _too_deep(limit: int) -> Refusal:
    return Refusal(400, f"the request body is nested too deeply: JSON may nest at most {limit} levels")


def _num_prompts(value: Any, field_name: str) -> int:
    """How many prompts (``prompt``, ``input``) or conversations (``messages``) a body carries; 1 when it is one."""
    if not isinstance(value, list) or not value:
        return 1
    if field_name != "messages":
        return 1 if all(_is_int(t) for t in value) else len(value)
    return len(value) if all(isinstance(c, list) for c in value) else 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shorten(text: str) -> str:
    return text if len(text) <= _LOGGED_CHARS else text[:_LOGGED_CHARS] + f"... ({len(text)} characters)"
