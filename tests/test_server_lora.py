"""LoRA adapters over real HTTP (``inferneo serve --enable-lora``): picked by name in ``model``, listed in
``/v1/models`` with the base model as parent, loaded and unloaded while requests run (none is lost), and refused
with 4xx errors that name the field."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from inferneo import LLM, LoRARequest, SamplingParams
from inferneo.testing.lora_adapters import make_peft_adapter, write_lora_adapter
from inferneo.testing.server import RemoteServer, port_in_use

pytest.importorskip("peft")

KEY = "token-abc123"  # the key docs/adapters.md uses
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["hello world", "the quick brown fox", "Once upon a time"]
MAX_TOKENS = 12
DOCS_PORT = 8000  # docs/adapters.md's examples talk to it
# Every module that serves on port 8000 (the docs' examples talk to it) runs on one xdist worker, so none of them
# finds the port taken by another and skips (--dist loadgroup, pyproject.toml).
pytestmark = pytest.mark.xdist_group("port-8000")


@pytest.fixture(scope="module")
def loras(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server-loras")
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    return {
        "sql": make_peft_adapter(tiny_llama_dir, root / "sql", r=8, target_modules=["q_proj", "v_proj"], seed=1),
        "chat": make_peft_adapter(tiny_llama_dir, root / "adapters" / "chat-lora", r=4, seed=4,
                                  target_modules=["o_proj", "down_proj"]),
        "mlp16": make_peft_adapter(tiny_llama_dir, root / "mlp16", r=16, seed=2,
                                   target_modules=["gate_proj", "up_proj", "down_proj", "k_proj"]),
        "r32": make_peft_adapter(tiny_llama_dir, root / "r32", r=32, target_modules=["q_proj"], seed=3),
        "other": write_lora_adapter({**config, "hidden_size": 96}, root / "other", r=4, target_modules=["q_proj"]),
    }


@pytest.fixture(scope="module")
def server(tiny_llama_dir, loras):
    busy = port_in_use(DOCS_PORT)
    if busy:
        pytest.skip(f"docs/adapters.md talks to port {DOCS_PORT}, but {busy}")
    with RemoteServer(tiny_llama_dir, "--served-model-name", "tiny", "--kv-cache-memory", "32MiB",
                      "--num-threads", "1", "--disable-access-log", "--dtype", "float32", "--api-key", KEY,
                      "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
                      "--lora-modules", f"sql={loras['sql']}",
                      json.dumps({"name": "sql-json", "path": str(loras["sql"]), "base_model_name": "tiny-base"}),
                      port=DOCS_PORT) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, loras):
    """What the offline engine (checked against PEFT in test_lora.py) answers, per adapter (None: base model)."""
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="16MiB", num_threads=1, enable_lora=True,
              max_loras=2)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    try:
        out = {}
        for i, name in enumerate((None, "sql", "mlp16")):
            lora = LoRARequest(name, i, str(loras[name])) if name else None
            out[name] = [o.outputs[0].text for o in llm.generate(PROMPTS, params, lora_request=lora, use_tqdm=False)]
        return out
    finally:
        llm.shutdown()


def post(server, path, body, headers=AUTH):
    return httpx.post(server.url(path), json=body, headers=headers, timeout=60)


def complete(server, model, prompt):
    r = post(server, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                         "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_models_lists_adapters_with_the_base_model_as_parent(server, loras):
    data = httpx.get(server.url("/v1/models"), headers=AUTH, timeout=10).json()["data"]
    cards = {c["id"]: c for c in data}
    assert cards["tiny"]["parent"] is None
    assert cards["sql"]["parent"] == "tiny" and cards["sql"]["root"] == str(loras["sql"])
    one = httpx.get(server.url("/v1/models/sql"), headers=AUTH, timeout=10).json()
    assert one["id"] == "sql" and one["parent"] == "tiny"


def test_a_request_picks_its_adapter_by_model_name(server, expected):
    assert [complete(server, "sql", p) for p in PROMPTS] == expected["sql"]
    assert [complete(server, "tiny", p) for p in PROMPTS] == expected[None]
    assert expected["sql"] != expected[None]
    r = post(server, "/v1/chat/completions", {"model": "sql", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 4})
    assert r.status_code == 200 and r.json()["model"] == "sql"


def test_lora_modules_take_vllms_json_form(server, loras, expected):
    """``--lora-modules '{"name": ..., "path": ..., "base_model_name": ...}'`` (vLLM's JSON form) serves the adapter
    under its name, with ``base_model_name`` as its parent in /v1/models."""
    card = httpx.get(server.url("/v1/models/sql-json"), headers=AUTH, timeout=10).json()
    assert card["parent"] == "tiny-base" and card["root"] == str(loras["sql"])
    assert [complete(server, "sql-json", p) for p in PROMPTS] == expected["sql"]


def test_lora_module_arguments_are_checked():
    from inferneo.lora.registry import LoraModule

    assert LoraModule.parse("a=/x=y") == LoraModule("a", "/x=y")
    assert LoraModule.parse('{"name": "a", "path": "/x"}') == LoraModule("a", "/x")
    for bad, why in [('{"name": "a"', "not valid JSON"), ('{"name": "a", "path": "/x", "rank": 8}', "'rank' too"),
                     ('{"name": "a", "path": 5}', "'path' must be a non-empty string"), ("a", "name=path")]:
        with pytest.raises(ValueError, match=why):
            LoraModule.parse(bad)


def test_model_cards_survive_a_load_finishing_meanwhile(tiny_llama_dir, loras):
    """/v1/load_lora_adapter checks and adds an adapter in a worker thread, which may run while /v1/models builds
    its cards on the event loop: here a load finishes between two cards (the card function adds it), and the
    listing still answers (it iterated the registry itself: 'dictionary changed size during iteration')."""
    from types import SimpleNamespace

    from inferneo.entrypoints.openai.serving_lora import lora_model_cards
    from inferneo.lora.registry import LoRARegistry
    from inferneo.model_executor.models.llama import DecoderConfig

    registry = LoRARegistry(DecoderConfig.from_hf(json.loads((tiny_llama_dir / "config.json").read_text())), 16,
                            ["tiny"])
    registry.add("sql", str(loras["sql"]))
    ctx = SimpleNamespace(loras=registry, served_model_names=["tiny"])

    def card(ctx, name):
        if "chat" not in registry.adapters:
            registry.add("chat", str(loras["chat"]))  # what the worker thread does when the GIL passes to it here
        return {"id": name}

    assert [c["id"] for c in lora_model_cards(ctx, card)] == ["sql"]
    assert [c["id"] for c in lora_model_cards(ctx, card)] == ["sql", "chat"]


def test_a_request_keeps_its_adapter_when_unloaded_while_its_prompt_is_tokenized(server, loras):
    """A long prompt is tokenized off the event loop; an unload of its adapter meanwhile must not turn the request
    into a base-model one answered under the adapter's name: it runs with the adapter it named on arrival."""
    long = "the quick brown fox " * 1000  # 20,000 characters: tokenized on the tokenizer thread

    def body(model):
        return {"model": model, "prompt": long, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "truncate_prompt_tokens": 40}

    assert post(server, "/v1/load_lora_adapter", {"lora_name": "racy", "lora_path": str(loras["sql"])}).status_code \
        == 200
    with_adapter = post(server, "/v1/completions", body("racy")).json()["choices"][0]["text"]
    assert with_adapter != post(server, "/v1/completions", body("tiny")).json()["choices"][0]["text"]

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=120) as client:
            # a prompt of 3,000,000 characters (under the 4 MiB body limit) holds the tokenizer thread for a while
            # (400,000 took under 0.6 s on an idle machine)
            blocker = asyncio.create_task(client.post("/v1/completions", json={
                "model": "tiny", "prompt": "the quick brown fox " * 150_000, "max_tokens": 1,
                "truncate_prompt_tokens": 8}))
            await asyncio.sleep(0.3)
            racy = asyncio.create_task(client.post("/v1/completions", json=body("racy")))
            await asyncio.sleep(0.3)  # named its adapter, waits for the tokenizer thread
            assert not blocker.done()
            unload = await client.post("/v1/unload_lora_adapter", json={"lora_name": "racy"})
            return unload, await racy, await blocker

    unload, racy, blocker = asyncio.run(scenario())
    assert unload.status_code == 200 and blocker.status_code == 200, (unload.text, blocker.text)
    assert racy.status_code == 200 and racy.json()["model"] == "racy", racy.text
    assert racy.json()["choices"][0]["text"] == with_adapter


def test_load_inplace_swaps_the_adapter_behind_a_name(server, loras, expected):
    """vLLM's ``load_inplace``: loading a name in use again serves the new folder (a new adapter to the engine, so
    neither its slots nor its prefix-cache entries hold the old weights); without it the name in use is a 400."""
    body = {"lora_name": "swap", "lora_path": str(loras["sql"])}
    assert post(server, "/v1/load_lora_adapter", body).status_code == 200
    assert [complete(server, "swap", p) for p in PROMPTS] == expected["sql"]
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "swap", "lora_path": str(loras["mlp16"])})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    swapped = post(server, "/v1/load_lora_adapter", {"lora_name": "swap", "lora_path": str(loras["mlp16"]),
                                                     "load_inplace": True})
    assert swapped.status_code == 200, swapped.text
    assert [complete(server, "swap", p) for p in PROMPTS] == expected["mlp16"]
    card = httpx.get(server.url("/v1/models/swap"), headers=AUTH, timeout=10).json()
    assert card["root"] == str(loras["mlp16"]) and card["parent"] == "tiny"
    base = post(server, "/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": str(loras["sql"]),
                                                  "load_inplace": True})
    assert base.status_code == 400 and base.json()["error"]["param"] == "lora_name"
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "swap"}).status_code == 200


def test_load_and_unload_while_requests_run_lose_none(server, loras, expected):
    async def one(client, model, prompt):
        r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                       "temperature": 0, "ignore_eos": True})
        return r.status_code, r.json()

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=120) as client:
            before = [asyncio.create_task(one(client, m, p)) for _ in range(3) for m in ("tiny", "sql")
                      for p in PROMPTS]
            await asyncio.sleep(0.05)
            load = await client.post("/v1/load_lora_adapter", json={"lora_name": "mlp16",
                                                                     "lora_path": str(loras["mlp16"])})
            during = [asyncio.create_task(one(client, "mlp16", p)) for p in PROMPTS]
            unload = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
            return load, unload, await asyncio.gather(*before), await asyncio.gather(*during)

    load, unload, before, during = asyncio.run(scenario())
    assert load.status_code == 200 and "mlp16" in load.text, load.text
    assert unload.status_code == 200, unload.text
    for (status, body), (model, prompt) in zip(before, [(m, p) for _ in range(3) for m in ("tiny", "sql")
                                                        for p in PROMPTS], strict=True):
        assert status == 200, body
        assert body["choices"][0]["text"] == expected[None if model == "tiny" else model][PROMPTS.index(prompt)]
        assert body["usage"]["completion_tokens"] == MAX_TOKENS
    assert [body["choices"][0]["text"] for _, body in during] == expected["mlp16"]
    gone = post(server, "/v1/completions", {"model": "sql", "prompt": "hi", "max_tokens": 2})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert gone.json()["error"]["param"] == "model"
    assert "LoRA adapters" in gone.json()["error"]["message"] and "'mlp16'" in gone.json()["error"]["message"]
    assert "sql" not in {c["id"] for c in httpx.get(server.url("/v1/models"), headers=AUTH).json()["data"]}
    # loaded again under its old name: a new adapter to the engine, the same answers
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(loras["sql"])})
    assert again.status_code == 200
    assert [complete(server, "sql", p) for p in PROMPTS] == expected["sql"]


def test_bad_adapters_and_names_are_refused(server, loras, tmp_path):
    def error(path, body, status, param, headers=AUTH):
        r = post(server, path, body, headers)
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param, r.text
        return r.json()["error"]["message"]

    assert "above max_lora_rank 16" in error("/v1/load_lora_adapter", {"lora_name": "big",
                                                                       "lora_path": str(loras["r32"])}, 400,
                                             "lora_path")
    assert "does not fit this model" in error("/v1/load_lora_adapter", {"lora_name": "other",
                                                                        "lora_path": str(loras["other"])},
                                              400, "lora_path")
    assert "does not exist" in error("/v1/load_lora_adapter", {"lora_name": "nope", "lora_path": "/no/such/dir"},
                                     400, "lora_path")
    assert "already been loaded" in error("/v1/load_lora_adapter", {"lora_name": "tiny",
                                                                    "lora_path": str(loras["mlp16"])},
                                          400, "lora_name")
    error("/v1/load_lora_adapter", {"lora_name": 5, "lora_path": str(loras["mlp16"])}, 400, "lora_name")
    error("/v1/load_lora_adapter", {"lora_path": str(loras["mlp16"])}, 400, "lora_name")
    assert "cannot be found" in error("/v1/unload_lora_adapter", {"lora_name": "never"}, 404, "lora_name")
    error("/v1/completions", {"model": "never", "prompt": "hi"}, 404, "model")
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(loras["mlp16"])}, headers={})
    assert r.status_code == 401
    # an adapter whose folder is gone by the time a request needs it: that request fails (400), the engine goes on
    doomed = tmp_path / "doomed"
    shutil.copytree(loras["mlp16"], doomed)
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "doomed", "lora_path": str(doomed)}).status_code == 200
    shutil.rmtree(doomed)
    r = post(server, "/v1/completions", {"model": "doomed", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"], r.text
    assert complete(server, "tiny", PROMPTS[0])
    # streamed through the Responses API, the same failure comes after response.created: OpenAI's error event,
    # then response.failed with the error (no chat-style error line, no [DONE]); the openai package reads it
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0, timeout=60)
    events = list(client.responses.create(model="doomed", input="hi", max_output_tokens=2, stream=True))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert "does not exist" in events[2].message and events[2].code
    assert [e.sequence_number for e in events] == [0, 1, 2, 3]
    failed = events[3].response
    assert failed.status == "failed" and failed.error.code == events[2].code and failed.error.message
    with httpx.stream("POST", server.url("/v1/responses"), headers=AUTH, timeout=60,
                      json={"model": "doomed", "input": "hi", "max_output_tokens": 2, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1].startswith("data: ") and json.loads(lines[-1][6:])["type"] == "response.failed", lines[-3:]
    assert not any("[DONE]" in line for line in lines)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "doomed"}).status_code == 200
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200


def test_the_adapters_page_serving_example_runs(server, loras, monkeypatch):
    blocks = re.findall(r"^```python\n(.*?)^```", (Path(__file__).parents[1] / "docs" / "adapters.md").read_text(),
                        flags=re.DOTALL | re.MULTILINE)
    block = next(b for b in blocks if "load_lora_adapter" in b)
    monkeypatch.chdir(loras["chat"].parents[1])  # where adapters/chat-lora is
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "<docs/adapters.md>", "exec"), {})
    lines = out.getvalue().splitlines()
    # the model list first, the completion's text (which may hold new lines), the load's answer, the chat's model
    assert "('sql', 'tiny')" in lines[0] and lines[-2].startswith("200 Success") and lines[-1] == "chat", lines
    assert "chat" not in {c["id"] for c in httpx.get(server.url("/v1/models"), headers=AUTH).json()["data"]}
