"""The HTTP layer's options of ``inferneo serve`` (vLLM's flags of the same names): TLS, the root path behind a
proxy, uvicorn's own log level, a Unix domain socket instead of TCP, the API docs pages, ``X-Request-Id`` headers
and ``/load``'s server-load tracking."""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
MAX_UDS_PATH_BYTES = 107  # sockaddr_un's sun_path holds 108 bytes, the terminating zero included (Linux)


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """``ssl_certfile`` and ``ssl_keyfile`` (PEM) serve HTTPS; ``ssl_ca_certs`` with ``ssl_cert_reqs`` (``ssl``'s
    ``CERT_NONE`` 0, ``CERT_OPTIONAL`` 1, ``CERT_REQUIRED`` 2) checks client certificates. ``root_path`` is the
    path prefix a reverse proxy strips before forwarding (``/api`` for ``https://host/api/v1/...``): routes stay
    ``/v1/...``. ``uvicorn_log_level`` sets uvicorn's loggers only (default: the server's ``--log-level``).
    ``uds``: listen on this Unix domain socket instead of the host and port. ``disable_fastapi_docs`` leaves out
    ``/docs``, ``/redoc`` and ``/openapi.json``. ``enable_request_id_headers``: every response carries
    ``X-Request-Id`` (``http_middleware.RequestIdMiddleware``). ``enable_server_load_tracking``: ``GET /load``
    counts the requests in flight on the model's routes (else it reads 0)."""

    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = int(ssl.CERT_NONE)
    root_path: str = ""
    uvicorn_log_level: str | None = None
    uds: str | None = None
    disable_fastapi_docs: bool = False
    enable_request_id_headers: bool = False
    enable_server_load_tracking: bool = False

    def __post_init__(self) -> None:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("--ssl-keyfile and --ssl-certfile go together (the certificate and its private key)")
        for flag, path in (("--ssl-keyfile", self.ssl_keyfile), ("--ssl-certfile", self.ssl_certfile),
                           ("--ssl-ca-certs", self.ssl_ca_certs)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag}: no such file: {path}")
        if self.ssl_cert_reqs not in (0, 1, 2):
            raise ValueError(f"--ssl-cert-reqs must be 0, 1 or 2 (ssl.CERT_NONE, CERT_OPTIONAL, CERT_REQUIRED); got "
                             f"{self.ssl_cert_reqs}")
        if self.root_path and (not self.root_path.startswith("/") or self.root_path.endswith("/")):
            raise ValueError(f"--root-path must start with '/' and not end with one (e.g. /api); got "
                             f"{self.root_path!r}")
        if self.uvicorn_log_level is not None and self.uvicorn_log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--uvicorn-log-level must be one of {', '.join(LOG_LEVELS)}; got "
                             f"{self.uvicorn_log_level!r}")
        if self.uds is not None:
            folder = Path(self.uds).parent
            if not self.uds or not folder.is_dir():
                raise ValueError(f"--uds: no folder for the socket {self.uds!r} (the folder must exist)")
            if len(os.fsencode(self.uds)) > MAX_UDS_PATH_BYTES:
                raise ValueError(f"--uds: the path is {len(os.fsencode(self.uds))} bytes long; a Unix socket's path "
                                 f"may have at most {MAX_UDS_PATH_BYTES} (give a shorter one)")
            if Path(self.uds).exists() and not Path(self.uds).is_socket():
                raise ValueError(f"--uds: {self.uds} exists and is not a socket; give a new path")

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """The ``uvicorn.Config`` keywords these options set (the log level apart)."""
        kwargs: dict[str, Any] = {"root_path": self.root_path}
        if self.uds is not None:
            kwargs["uds"] = self.uds  # uvicorn then ignores host and port
        if self.ssl_certfile is not None:
            kwargs.update(ssl_keyfile=self.ssl_keyfile, ssl_certfile=self.ssl_certfile,
                          ssl_ca_certs=self.ssl_ca_certs, ssl_cert_reqs=self.ssl_cert_reqs)
        return kwargs


def add_http_args(group: argparse._ArgumentGroup) -> None:
    """The flags of :class:`HttpOptions`."""
    group.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
    group.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    group.add_argument("--ssl-ca-certs", default=None, help="CA certificates to check client certificates with")
    group.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE),
                       help="client certificates: 0 not asked (default), 1 optional, 2 required")
    group.add_argument("--root-path", default="",
                       help="the path prefix a reverse proxy strips before forwarding here (e.g. /api)")
    group.add_argument("--uvicorn-log-level", default=None, choices=LOG_LEVELS,
                       help="uvicorn's log level (default: --log-level)")
    group.add_argument("--uds", default=None, metavar="PATH",
                       help="listen on this Unix domain socket instead of --host/--port (which are then ignored)")
    group.add_argument("--disable-fastapi-docs", action="store_true",
                       help="do not serve the API's OpenAPI schema (/openapi.json) nor its Swagger UI (/docs) and "
                       "ReDoc (/redoc) pages")
    group.add_argument("--enable-request-id-headers", action="store_true",
                       help="every response carries X-Request-Id: the request's own, else a new random id")
    group.add_argument("--enable-server-load-tracking", action="store_true",
                       help="count the requests in flight on the model's routes, read at GET /load as "
                       "{\"server_load\": N} (without this flag it reads 0)")


def http_options_from_args(args: argparse.Namespace) -> HttpOptions:
    """``HttpOptions`` from the flags ``add_http_args`` added."""
    return HttpOptions(ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
                       ssl_cert_reqs=args.ssl_cert_reqs, root_path=args.root_path,
                       uvicorn_log_level=args.uvicorn_log_level, uds=args.uds,
                       disable_fastapi_docs=args.disable_fastapi_docs,
                       enable_request_id_headers=args.enable_request_id_headers,
                       enable_server_load_tracking=args.enable_server_load_tracking)
