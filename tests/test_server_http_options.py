"""vLLM's HTTP-layer serve flags on a real server: HTTPS (``--ssl-keyfile``/``--ssl-certfile``) with the openai
client, ``--root-path`` behind a prefix-stripping proxy, the periodic engine-statistics log and
``--disable-log-stats``, ``--enable-log-requests``/``--disable-log-requests``, and start-up refusals."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import sys
import time

import httpx
import openai
import pytest

from inferneo.engine.protocol import EngineSnapshot
from inferneo.entrypoints.openai.stats_logger import stats_line
from inferneo.testing.server import RemoteServer

STATS = re.compile(r"prompt throughput [\d.]+ tokens/s, generation throughput [\d.]+ tokens/s, running \d+ reqs")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_https_root_path_and_the_stats_log(tiny_llama_dir, certificate):
    key, cert = certificate
    trust = ssl.create_default_context(cafile=str(cert))
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", "--ssl-keyfile", str(key), "--ssl-certfile",
                      str(cert), "--root-path", "/api", "--kv-cache-memory", "32MiB", "--enable-log-requests",
                      env={"INFERNEO_LOG_STATS_INTERVAL_S": "0.5"}, tls=trust) as server:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0,
                               http_client=httpx.Client(verify=trust))
        answer = client.completions.create(model="tiny", prompt="hello world", max_tokens=4, temperature=0)
        assert answer.choices[0].text is not None and answer.usage.completion_tokens >= 1
        with pytest.raises(httpx.TransportError):  # plain HTTP is not served on the TLS port
            httpx.get(server.url("/health").replace("https://", "http://"), timeout=5)
        # a proxy that strips /api forwards /v1/...; the routes and the guards read the path without the prefix
        assert httpx.get(server.url("/metrics"), verify=trust, timeout=10).status_code == 200
        assert httpx.get(server.url("/api/v1/models"), verify=trust, timeout=10).status_code == 404
        assert wait_for(lambda: STATS.search(server.log()) is not None), server.log()
        log = server.log()
        assert "serving the OpenAI API at https://127.0.0.1:" in log and "/api/v1" in log
        assert "request POST /v1/completions" in log and "hello world" in log  # --enable-log-requests


def test_disable_log_stats_and_disable_log_requests(tiny_llama_dir):
    with RemoteServer(tiny_llama_dir, "--kv-cache-memory", "32MiB", "--disable-log-stats",
                      "--disable-log-requests", env={"INFERNEO_LOG_STATS_INTERVAL_S": "0.3"}) as server:
        response = httpx.post(server.url("/v1/completions"), json={"prompt": "hello", "max_tokens": 8,
                                                                    "ignore_eos": True}, timeout=60)
        assert response.status_code == 200
        time.sleep(1.5)
        log = server.log()
        assert STATS.search(log) is None and "hello" not in log, log


@pytest.mark.parametrize("args, message", [
    (["--ssl-keyfile", "missing-key.pem"], "--ssl-keyfile and --ssl-certfile go together"),
    (["--root-path", "api/"], "--root-path must start with '/'"),
    (["--log-requests", "--disable-log-requests"], "contradict"),
    (["--allowed-origins", "http://a.example", "--allowed-methods", '["GET", 1]'], "not a JSON list of strings"),
    (["--uds", "no-such-folder/inferneo.sock"], "--uds: no folder for the socket"),
    (["--uds", "/tmp/" + "s" * 110], "a Unix socket's path may have at most 107"),
])
def test_bad_http_flags_fail_before_the_model_loads(tiny_llama_dir, args, message):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "inferneo.cli", "serve", str(tiny_llama_dir), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert "loaded" not in done.stderr and time.monotonic() - started < 60


def test_stats_line_reports_the_interval_and_stays_quiet_when_idle():
    before = EngineSnapshot(num_prompt_tokens=100, num_generation_tokens=50, prefix_cache_queries=10,
                            prefix_cache_hits=2)
    after = EngineSnapshot(num_running=3, num_waiting=1, kv_usage=0.25, num_prompt_tokens=300,
                           num_generation_tokens=90, prefix_cache_queries=30, prefix_cache_hits=12, num_preemptions=2)
    assert stats_line(before, after, 2.0) == (
        "prompt throughput 100.0 tokens/s, generation throughput 20.0 tokens/s, running 3 reqs, waiting 1 reqs, "
        "KV cache usage 25.0%, prefix cache hit rate 50.0%, 2 preempted")
    assert stats_line(after, EngineSnapshot(**{**{f: getattr(after, f) for f in after.__struct_fields__},
                                               "num_running": 0, "num_waiting": 0}), 10.0) is None
