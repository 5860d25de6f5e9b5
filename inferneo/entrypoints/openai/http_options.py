"""The HTTP layer's options of ``inferneo serve`` (vLLM's flags of the same names): TLS, the root path behind a
proxy, and uvicorn's own log level."""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """``ssl_certfile`` and ``ssl_keyfile`` (PEM) serve HTTPS; ``ssl_ca_certs`` with ``ssl_cert_reqs`` (``ssl``'s
    ``CERT_NONE`` 0, ``CERT_OPTIONAL`` 1, ``CERT_REQUIRED`` 2) checks client certificates. ``root_path`` is the
    path prefix a reverse proxy strips before forwarding (``/api`` for ``https://host/api/v1/...``): routes stay
    ``/v1/...``. ``uvicorn_log_level`` sets uvicorn's loggers only (default: the server's ``--log-level``)."""

    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = int(ssl.CERT_NONE)
    root_path: str = ""
    uvicorn_log_level: str | None = None

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

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """The ``uvicorn.Config`` keywords these options set (the log level apart)."""
        kwargs: dict[str, Any] = {"root_path": self.root_path}
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


def http_options_from_args(args: argparse.Namespace) -> HttpOptions:
    """``HttpOptions`` from the flags ``add_http_args`` added."""
    return HttpOptions(ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
                       ssl_cert_reqs=args.ssl_cert_reqs, root_path=args.root_path,
                       uvicorn_log_level=args.uvicorn_log_level)
