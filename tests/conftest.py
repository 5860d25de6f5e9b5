"""Shared fixtures: tiny checkpoints built once per test session."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from inferneo.testing import make_tiny_checkpoint
from inferneo.testing.server import RemoteServer

# Engines built in tests take the CPU's first-choice linear kernel instead of timing the candidates at start-up, so
# the module types a test checks do not depend on the machine's load, and no test writes the user's tune cache.
# tests/test_cpu_linear_choice.py turns the tune on (with its cache in a temporary folder). Servers and workers the
# tests start inherit this.
os.environ.setdefault("INFERNEO_CPU_LINEAR_TUNE", "0")
# GGUF engines take the exact float path, whatever the caller's environment says: the tests compare them with
# de-quantized references token for token, and the int8 dot path (not bit-exact) is asked for by name where it is
# tested (``KernelConfig(gguf_int8_dot=True)`` in tests/test_gguf_quantized.py).
os.environ["INFERNEO_GGUF_INT8_DOT"] = "0"
# No test reaches the Hugging Face Hub: a hub id missing from the cache fails at once instead of being downloaded.
# tests/test_hub_download.py serves a fake Hub and turns downloads on in the processes it starts.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(arch="llama", **kwargs) -> folder``; each distinct call is built once per session."""
    cache: dict[str, Path] = {}

    def factory(arch: str = "llama", **kwargs: Any) -> Path:
        key = repr((arch, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **kwargs)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_checkpoint_factory: Callable[..., Path]) -> Path:
    """A tiny random Llama checkpoint (HF format, with tokenizer and chat template)."""
    return tiny_checkpoint_factory("llama")


@pytest.fixture(scope="session")
def wide16_ops():
    """The native GGUF module where it runs the wide16 kernels (AVX512F/BW/VL/DQ); the test skips elsewhere, naming
    what is missing (tests/test_gguf_wide16.py, tests/test_gguf_dense.py)."""
    from inferneo.kernels.cpu_gguf import load_gguf_kernels

    ops = load_gguf_kernels()
    if ops is None or not ops.gguf_packed_available():
        pytest.skip("the wide16 kernels need the native GGUF build and AVX512F/BW/VL/DQ, which this CPU lacks")
    return ops


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session: a head node and a second simulated node, one CPU each,
    no dashboard. Tests that need Ray take this fixture (and are marked ``ray``), so CI starts Ray once."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # A raylet registers within 10 s by default; on a loaded 2-core CI machine it sometimes takes longer.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "240")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


# A ChatML template that renders tools and tool calls as Hermes / Qwen models see them; it refuses arguments given
# as a string, so a test passes only if the server hands the template decoded arguments, as vLLM does.
HERMES_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{% if c.function.arguments is string %}"
    "{{ raise_exception('arguments must be a mapping') }}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n"
    "</tool_call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


@pytest.fixture(scope="session")
def hermes_model_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with the Hermes-style template."""
    folder = tmp_path_factory.mktemp("tiny-hermes")
    for item in Path(tiny_llama_dir).iterdir():
        if item.is_file():
            (folder / item.name).write_bytes(item.read_bytes())
    if (folder / "chat_template.jinja").is_file():
        (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = HERMES_TEMPLATE
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hermes_server(hermes_model_dir):
    """A real ``inferneo serve`` of the Hermes-template tiny model, named ``tiny`` (one per test module)."""
    with RemoteServer(hermes_model_dir, "--served-model-name", "tiny", "--kv-cache-memory", "32MiB",
                      "--num-threads", "1", "--disable-access-log") as srv:
        yield srv


@pytest.fixture(scope="module")
def hermes_client(hermes_server):
    """The ``openai`` package's client of ``hermes_server``."""
    return openai.OpenAI(base_url=hermes_server.url("/v1"), api_key="unused", max_retries=0, timeout=120)
