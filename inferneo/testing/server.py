"""A real ``inferneo serve`` in a subprocess, for tests that talk to it over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def port_in_use(port: int) -> str | None:
    """Why ``port`` cannot be ours, or ``None`` when it is free on both loopback addresses."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                if sock.connect_ex((host, port)) == 0:
                    return f"something already listens on {host}:{port}"
            except OSError:
                continue  # no IPv6 here
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RemoteServer:
    """Starts ``python -m inferneo.cli serve --model MODEL --port P ARGS...`` and waits for ``/health``.

    Use as a context manager, or call ``close()``; ``stop()`` stops it and keeps ``log()``, what it printed.
    ``tls``: an ``ssl.SSLContext`` that trusts the server's certificate (given in ``args``): the server is then
    reached over HTTPS. ``uds``: the server listens on this Unix domain socket (``--uds``) instead of the port;
    ``base_url`` is then ``http://localhost`` and clients connect through ``transport()``.
    """

    def __init__(self, model: str | Path, *args: str, startup_timeout: float = 120.0,
                 env: dict[str, str] | None = None, port: int | None = None, own_session: bool = False,
                 tls: ssl.SSLContext | None = None, uds: str | Path | None = None) -> None:
        self.port = port or free_port()
        self.tls = tls
        self.uds = None if uds is None else str(uds)
        host = "localhost" if uds is not None else f"127.0.0.1:{self.port}"
        self.base_url = f"{'https' if tls else 'http'}://{host}"
        self._log = tempfile.NamedTemporaryFile(prefix="inferneo-serve-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [sys.executable, "-m", "inferneo.cli", "serve", "--model", str(model), "--port", str(self.port),
               *(["--uds", self.uds] if self.uds else []), *args]
        child_env = {k: v for k, v in os.environ.items() if k != "INFERNEO_API_KEY"} if port else dict(os.environ)
        # own_session: the server leads a process group of its own, which a test may signal whole (as systemd,
        # `timeout` and `kill -- -PGID` do)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**child_env, **(env or {})}, start_new_session=own_session)
        self._wait_ready(startup_timeout)

    def url(self, path: str) -> str:
        return self.base_url + path

    def transport(self) -> httpx.HTTPTransport | None:
        """The httpx transport that reaches the server (over its Unix socket with ``uds``; else None: TCP)."""
        return httpx.HTTPTransport(uds=self.uds, verify=self.tls or True) if self.uds else None

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(transport=self.transport(), verify=self.tls or True, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.get(self.url("/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"the server did not become healthy in {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit status (killing the process if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def close(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (if it still runs) and delete its log."""
        self.stop(sig)
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def docs_server(model: str | Path, port: int, served_model_name: str, *args: str) -> RemoteServer:
    """A keyless server on the fixed port that documentation examples hard-code; skips the test if it is taken."""
    import pytest

    busy = port_in_use(port)
    if busy:
        pytest.skip(f"the examples talk to port {port}, but {busy}")
    return RemoteServer(model, "--served-model-name", served_model_name, "--max-model-len", "512",
                        "--kv-cache-memory", "64MiB", "--disable-access-log", *args, port=port)
