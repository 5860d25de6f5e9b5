"""Property-based requests from the server's own OpenAPI schema (schemathesis): valid and invalid bodies for every
operation, a bounded and derandomized number of them, and none may get a 5xx.

The server runs with tight limits (context 64 tokens, at most 8 sequences per request) so that the valid requests
schemathesis makes stay cheap.
"""

from __future__ import annotations

import importlib
import signal

import pytest

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402

from inferneo.testing.server import RemoteServer  # noqa: E402

# ``from_url`` imports schemathesis' OpenAPI modules lazily, and under pytest they are compiled through its
# assertion-rewriting hook (``ast.parse``). Done inside the fixture, late in a full run while threads left by earlier
# tests may also build ASTs, CPython 3.11's per-interpreter AST depth counter can be corrupted
# ("SystemError: AST constructor recursion depth mismatch", python/cpython#106905). Importing them here, at
# collection, before any test starts a thread, keeps that out of the run.
importlib.import_module("schemathesis.specs.openapi.schemas")

MAX_EXAMPLES = 60  # per operation and generation mode
SENT: list[int] = []  # status of every request made, for the summary test
# The summary test reads SENT, which only the generated tests of the same process fill: under pytest-xdist every test
# of this module runs on one worker (``--dist loadgroup``, in pyproject.toml's addopts).
pytestmark = pytest.mark.xdist_group("schemathesis")


@pytest.fixture(scope="module")
def schema_server(tiny_llama_dir):
    srv = RemoteServer(tiny_llama_dir, "--max-model-len", "64", "--kv-cache-memory", "16MiB", "--num-threads", "1",
                       "--max-prompts-per-request", "4", "--max-n", "4", "--max-seqs-per-request", "8",
                       "--disable-access-log")
    yield srv
    srv.close(signal.SIGKILL)


@pytest.fixture(scope="module")
def api_schema(schema_server):
    config = schemathesis.Config.from_dict({
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "no-shrink": True},
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    })
    return schemathesis.openapi.from_url(schema_server.url("/openapi.json"), config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_no_request_gets_a_server_error(case, schema_server):
    response = case.call(base_url=schema_server.base_url, timeout=60)
    SENT.append(response.status_code)
    case.validate_response(response, checks=[not_a_server_error])


def test_schemathesis_made_enough_requests_and_the_server_is_healthy(schema_server):
    import httpx

    assert len(SENT) >= 200, len(SENT)  # 304 with schemathesis 4.32 (200: 11, 400: 226, 404: 67)
    assert all(status < 500 for status in SENT)
    assert httpx.get(schema_server.url("/health")).status_code == 200
